"""The shipped deployment files stay valid: every key is a known setting and every unit runs one of our programs."""

from __future__ import annotations

import configparser
import pathlib
import tomllib

import pytest

from kvstore import config

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"
ENTRY_POINTS = {"kvstore-master", "kvstore-node"}


@pytest.mark.parametrize("path", sorted((DEPLOY / "config").glob("*.toml")), ids=lambda p: p.name)
def test_example_config_loads(path: pathlib.Path) -> None:
    cfg = config.load(config_file=str(path), environ={})
    with path.open("rb") as fh:
        written = tomllib.load(fh)
    for name in written:
        assert getattr(cfg, name) is not None
    assert cfg.etcd, "a multi-host deployment runs on etcd"


@pytest.mark.parametrize("path", sorted((DEPLOY / "systemd").glob("*.service")), ids=lambda p: p.name)
def test_systemd_unit_runs_an_entry_point(path: pathlib.Path) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(path)
    program = pathlib.Path(unit["Service"]["ExecStart"].split()[0]).name
    assert program in ENTRY_POINTS
    config_file = unit["Service"]["Environment"].split("=", 1)[1].split()[0]
    assert (DEPLOY / "config" / pathlib.Path(config_file).name).exists()
