"""Every setting of kvstore, in one table.

Each :class:`Setting` has a name, a type, a default, an environment variable
(``KVSTORE_<NAME>``) and the components that read it.  Values are layered:
defaults < TOML file (``--config`` or ``KVSTORE_CONFIG``) < environment <
command-line flags.  Nothing else in kvstore reads ``os.environ``.

Sizes take human units (``512MiB``, ``8GiB``, ``4096``); durations are in
milliseconds.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTP", start=1):
    _SIZE_UNITS[_p] = _SIZE_UNITS[_p + "IB"] = _SIZE_UNITS[_p + "I"] = 1024**_i
    _SIZE_UNITS[_p + "B"] = 1000**_i


def parse_size(text: str | int) -> int:
    """'8GiB' -> 8589934592; '1.5MB' -> 1500000; plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512MiB, 8GiB)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").upper()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_fraction(text: str | float) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must lie in (0, 1]: {text!r}")
    return value


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    components: tuple[str, ...]
    help: str

    @property
    def env(self) -> str:
        return "KVSTORE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


MASTER, NODE, CLIENT, CLI = "master", "node", "client", "cli"

SETTINGS: tuple[Setting, ...] = (
    # -- where things listen
    Setting(
        "host", str, "127.0.0.1", (MASTER, NODE), "address services bind to (loopback unless told otherwise)"
    ),
    Setting("port", int, 50051, (MASTER,), "master gRPC port"),
    Setting("node_port", int, 0, (NODE,), "node gRPC control port (0: any free port)"),
    Setting("data_port", int, 0, (NODE,), "node TCP data-server port (0: any free port)"),
    Setting(
        "advertise_host", str, "", (NODE,), "host name other hosts use to reach this node (default: --host)"
    ),
    Setting("master", str, "127.0.0.1:50051", (NODE, CLIENT, CLI), "master address(es), comma separated"),
    Setting(
        "etcd",
        str,
        "",
        (MASTER, NODE, CLIENT, CLI),
        "etcd endpoints HOST:PORT[,...]; empty: embedded metadata backend (clients: find the leader there)",
    ),
    Setting(
        "cluster",
        str,
        "default",
        (MASTER, NODE, CLIENT, CLI),
        "cluster name: its etcd keys live under /kvstore/<cluster>/",
    ),
    Setting(
        "leader_ttl_ms",
        int,
        3_000,
        (MASTER,),
        "lease of the leading master in etcd (whole seconds, >= 1 s): a dead leader is replaced after about this long",
    ),
    Setting(
        "warmup_ms",
        int,
        -1,
        (MASTER,),
        "a new leader allocates and evicts nothing on nodes it adopted for this long "
        "(-1: the longer of read_lease_ms and write_lease_ms)",
    ),
    # -- node memory
    Setting("node_id", str, "", (NODE,), "stable node name (default: host name + data port)"),
    Setting("dram", parse_size, parse_size("1GiB"), (NODE,), "DRAM tier capacity (slot area)"),
    Setting("shm_dir", str, "/dev/shm", (NODE,), "directory of DRAM pool files (tmpfs)"),
    Setting(
        "prefault", _parse_bool, True, (NODE,), "touch every pool page at start so first writes do not fault"
    ),
    # tiers: NVMe and VRAM regions of a node
    Setting("nvme", str, "", (NODE,), "NVMe tier: SIZE:DIRECTORY, e.g. 200GiB:/mnt/nvme0 (empty: none)"),
    Setting("nvme_direct", str, "auto", (NODE,), "auto | on | off: O_DIRECT for the NVMe tier's file"),
    Setting("nvme_io_threads", int, 4, (NODE,), "NVMe requests in flight at once (threads, GIL released)"),
    Setting("vram", str, "", (NODE,), "VRAM tier: SIZE:GPU, e.g. 10GiB:0 (empty: none; needs CuPy)"),
    # -- master policy
    Setting("read_lease_ms", int, 30_000, (MASTER,), "default read lease"),
    Setting("write_lease_ms", int, 30_000, (MASTER,), "default write lease of a put session"),
    Setting("max_lease_ms", int, 300_000, (MASTER,), "longest lease a client may ask for"),
    Setting(
        "quarantine_ms", int, -1, (MASTER,), "how long a freed slot waits before reuse (-1: the write lease)"
    ),
    Setting(
        "evicted_quarantine_ms",
        int,
        0,
        (MASTER,),
        "quarantine of slots of evicted complete pages (no writer holds them; readers are fenced by generation)",
    ),
    Setting("heartbeat_ms", int, 1_000, (MASTER, NODE), "node heartbeat interval"),
    Setting(
        "node_ttl_ms",
        int,
        5_000,
        (MASTER, NODE),
        "a node silent this long is dead (also the TTL of its etcd registration)",
    ),
    Setting("arena_bytes", parse_size, parse_size("16MiB"), (MASTER,), "allocation unit of node regions"),
    Setting("high_watermark", _parse_fraction, 0.95, (MASTER,), "evict when a region is fuller than this"),
    Setting("low_watermark", _parse_fraction, 0.85, (MASTER,), "... down to this"),
    # tiers: per-tier watermarks (DRAM uses high_watermark/low_watermark), moves, pins
    Setting("vram_high_watermark", _parse_fraction, 0.90, (MASTER,), "demote VRAM pages past this"),
    Setting("vram_low_watermark", _parse_fraction, 0.80, (MASTER,), "... down to this"),
    Setting("nvme_high_watermark", _parse_fraction, 0.95, (MASTER,), "evict NVMe pages past this"),
    Setting("nvme_low_watermark", _parse_fraction, 0.90, (MASTER,), "... down to this"),
    Setting("tier_policy", str, "lru", (MASTER,), "which pages tier moves pick: lru"),
    Setting("tier_move_batch", int, 256, (MASTER,), "pages per demotion/drain move (one node RPC)"),
    Setting(
        "promote_on_hit",
        _parse_bool,
        True,
        (MASTER,),
        "acquire promotes NVMe pages to DRAM (off: the hit ends there)",
    ),
    Setting("max_pin_ms", int, 3_600_000, (MASTER,), "longest pin a client may ask for"),
    Setting("max_request_pages", int, 65_536, (MASTER,), "most pages in one request"),
    Setting(
        "max_message_bytes", parse_size, parse_size("64MiB"), (MASTER, NODE, CLIENT), "largest gRPC message"
    ),
    Setting("max_extra_bytes", parse_size, parse_size("1MiB"), (MASTER,), "largest extra blob"),
    Setting(
        "extras_budget", parse_size, parse_size("256MiB"), (MASTER,), "memory for extras (LRU beyond it)"
    ),
    Setting(
        "grant_secret",
        str,
        "",
        (MASTER, NODE),
        "hex HMAC key for grants; empty: master makes one and hands it to nodes",
    ),
    # -- client
    Setting("rpc_timeout_ms", int, 10_000, (CLIENT, CLI, NODE), "deadline of each control RPC"),
    Setting(
        "failover_wait_ms",
        int,
        10_000,
        (CLIENT,),
        "how long a control call keeps retrying while the leading master changes before it fails UNAVAILABLE",
    ),
    Setting(
        "control_stream",
        _parse_bool,
        True,
        (CLIENT,),
        "send the hot control calls (OpenPut, CommitLayer, AcquirePrefix, ReleaseLease...) over one "
        "multiplexed gRPC stream per master instead of unary calls",
    ),
    Setting(
        "commit_each_layer",
        _parse_bool,
        True,
        (CLIENT,),
        "commit every put_layer's layer as soon as its bytes are in (what layer-streaming readers need); "
        "false: one durable CommitLayer per request, with the call that completes its layers (fewer "
        "control messages for engines without streaming readers)",
    ),
    Setting(
        "put_lease_ms",
        int,
        0,
        (CLIENT,),
        "write lease asked for each put; it must cover the whole prefill (0: the master's write_lease_ms)",
    ),
    Setting(
        "stream_wait_ms",
        int,
        0,
        (CLIENT,),
        "get_prefix_stream: how long the master waits for page 0 to be opened by a writer (0: don't wait)",
    ),
    Setting("transport", str, "auto", (CLIENT,), "auto | shm | tcp: force a data path"),
    Setting(
        "put_tier",
        str,
        "auto",
        (CLIENT,),
        "auto | dram | vram: where puts ask to be placed (auto: the node's VRAM for GPU sources, else DRAM)",
    ),
    Setting("copy_threads", int, 2, (CLIENT, NODE), "threads of the native copy engine for large batches"),
    Setting("host_id", str, "", (CLIENT, NODE), "placement host identity (default: machine id + host name)"),
    # -- operations
    Setting("log_level", str, "WARNING", (MASTER, NODE, CLI), "logging level"),
    Setting("log_json", _parse_bool, False, (MASTER, NODE), "structured JSON log lines"),
    Setting("metrics_port", int, 0, (MASTER, NODE), "Prometheus metrics port (0: off)"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class Config:
    """Resolved settings; read them as attributes (``cfg.read_lease_ms``)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting named {name!r}") from None

    def replace(self, **changes: Any) -> Config:
        merged = dict(self._values)
        for name, value in changes.items():
            merged[name] = _BY_NAME[name].parse(value)
        return Config(merged)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def to_toml(self) -> str:
        lines = []
        for s in SETTINGS:
            value = self._values[s.name]
            if s.name == "grant_secret" and value:
                value = "<set>"
            rendered = (
                str(value).lower()
                if isinstance(value, bool)
                else repr(value)
                if isinstance(value, str)
                else str(value)
            )
            lines.append(f"{s.name} = {rendered.replace(chr(39), chr(34))}  # {s.help}")
        return "\n".join(lines) + "\n"

    @property
    def quarantine_s(self) -> float:
        ms = self.quarantine_ms if self.quarantine_ms >= 0 else self.write_lease_ms
        return ms / 1000.0


def _parse(setting: Setting, value: Any, origin: str) -> Any:
    try:
        return setting.parse(value)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"kvstore: bad value for {setting.name} from {origin}: {exc}") from exc


def load(
    overrides: Mapping[str, Any] | None = None,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve every setting: defaults < TOML file < environment < ``overrides``."""
    env = os.environ if environ is None else environ
    values = {s.name: s.default for s in SETTINGS}
    path = config_file or env.get("KVSTORE_CONFIG")
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        for name, value in data.items():
            if name not in _BY_NAME:
                raise SystemExit(f"kvstore: unknown setting {name!r} in {path}")
            values[name] = _parse(_BY_NAME[name], value, path)
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = _parse(s, env[s.env], s.env)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _parse(_BY_NAME[name], value, "flags")
    if values["low_watermark"] > values["high_watermark"]:
        raise SystemExit("kvstore: low_watermark must not exceed high_watermark")
    return Config(values)


def add_flags(parser: argparse.ArgumentParser, component: str) -> None:
    """Add one flag per setting the component reads (defaults stay in the table)."""
    parser.add_argument("--config", help="TOML file of settings (env KVSTORE_CONFIG)")
    for s in SETTINGS:
        if component in s.components:
            parser.add_argument(
                s.flag, dest=s.name, default=None, help=f"{s.help} [{s.env}; default {s.default}]"
            )


def from_args(args: argparse.Namespace, extra: Iterable[str] = ()) -> Config:
    overrides = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    return load(overrides, getattr(args, "config", None))
