"""The ``kvstore`` command line against real processes: up (with the demo), nodes, stats, namespaces,
evict, config.  Commands run as subprocesses, exactly as a person or a script would run them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from kvstore.testing import page_bytes, prompt, run_cli, wait_for
from kvstore.tiers.dram import POOL_PREFIX


@pytest.fixture
def shm_dir():
    path = tempfile.mkdtemp(prefix="kvstore-cli-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _pool_files(path: str) -> list[str]:
    return [n for n in os.listdir(path) if n.startswith(POOL_PREFIX)]


def test_up_demo_runs_and_leaves_no_shm_files(shm_dir):
    result = run_cli(
        "up", "--port", "0", "--dram", "64MiB", "--shm-dir", shm_dir, "--demo", "--demo-exit", timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"kvstore master listening on 127\.0\.0\.1:\d+", out), out
    assert "bytes identical" in out, out
    assert "matches 32 tokens" in out, out
    assert "stopped; no pool files left" in out, out
    assert _pool_files(shm_dir) == []


def test_up_stops_cleanly_on_sigint(shm_dir):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvstore.cli.main",
            "up",
            "--port",
            "0",
            "--dram",
            "32MiB",
            "--shm-dir",
            shm_dir,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean,
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("stop with"):
                break
        text = "".join(lines)
        address = re.search(r"listening on (\S+)", text)
        assert address, text + (proc.stderr.read() if proc.stderr else "")
        assert len(_pool_files(shm_dir)) == 1
        nodes = run_cli("--master", address.group(1), "nodes", "--json")
        assert nodes.returncode == 0, nodes.stderr
        assert [n["alive"] for n in json.loads(nodes.stdout)["nodes"]] == [True]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert "no pool files left" in out
    assert _pool_files(shm_dir) == []


def test_admin_commands(cluster, client, namespace):
    c = client(cluster, namespace)
    c.create_namespace(page_size=16, num_layers=2, segment_bytes=4096)
    tokens = prompt(70, 64)
    for layer in range(2):
        c.put_layer(tokens, layer, page_bytes(layer, 4, 4096))
    assert c.get_prefix(tokens).num_pages == 4
    master = ["--master", cluster.master_address]

    nodes = run_cli(*master, "nodes", "--json")
    assert nodes.returncode == 0, nodes.stderr
    data = json.loads(nodes.stdout)
    assert [n["node_id"] for n in data["nodes"]] == [cluster.nodes[0].node_id]
    assert data["nodes"][0]["alive"] is True
    assert data["nodes"][0]["tiers"][0]["capacity_bytes"] > 0

    # --master after the subcommand and --json before it work too
    stats = run_cli("--json", "stats", *master)
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    tier = data["nodes"][0]["tiers"][0]
    assert isinstance(tier["capacity_bytes"], int) and tier["pages"] >= 4
    assert data["pages"] >= 4 and data["lookups"] >= 4 and 0 < data["hit_rate"] <= 1
    assert any(ns["name"] == namespace and ns["pages"] == 4 for ns in data["namespaces"])

    table = run_cli(*master, "stats")
    assert table.returncode == 0 and "hit rate" in table.stdout and cluster.nodes[0].node_id in table.stdout
    assert "capacity" in run_cli(*master, "nodes").stdout

    listed = run_cli(*master, "namespaces", "--json")
    assert listed.returncode == 0, listed.stderr
    spec = next(n for n in json.loads(listed.stdout)["namespaces"] if n["name"] == namespace)
    assert spec["page_size"] == 16 and spec["num_layers"] == 2 and spec["pages"] == 4
    assert namespace in run_cli(*master, "namespaces").stdout

    evicted = run_cli(*master, "evict", "--namespace", namespace, "--json")
    assert evicted.returncode == 0, evicted.stderr
    assert json.loads(evicted.stdout)["pages_evicted"] == 4
    wait_for(lambda: c.match_prefix(tokens) == 0, 5.0, "the evicted pages to be gone")
    assert run_cli(*master, "evict").returncode != 0  # neither --namespace nor --all: refused

    remote = run_cli(*master, "config", "--remote")
    assert remote.returncode == 0, remote.stderr
    assert "read_lease_ms = 2000" in remote.stdout
    assert cluster.grant_secret not in remote.stdout


def test_local_config_layers_flags_over_environment():
    result = run_cli("--master", "10.0.0.1:6000", "config", env={"KVSTORE_RPC_TIMEOUT_MS": "1234"})
    assert result.returncode == 0, result.stderr
    assert 'master = "10.0.0.1:6000"' in result.stdout
    assert "rpc_timeout_ms = 1234" in result.stdout
    as_json = json.loads(run_cli("config", "--json", env={"KVSTORE_GRANT_SECRET": "ab" * 16}).stdout)
    assert as_json["settings"]["grant_secret"] == "<set>"


def test_unreachable_master_is_a_clear_error():
    result = run_cli("--master", "127.0.0.1:1", "--rpc-timeout-ms", "500", "nodes")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "kvstore up" in result.stderr
    assert "Traceback" not in result.stderr


def _bench_report(out, *args: str, timeout: float = 180) -> dict:  # type: ignore[no-untyped-def]
    """Run ``kvstore bench ARGS --json OUT``; its JSON report (the command must succeed)."""
    result = run_cli("bench", *args, "--json", str(out), timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "not-yet" / "bench.json"  # the bench makes the folder
    report = _bench_report(
        out,
        *("--parts", "throughput", "--bytes", "16MiB", "--sizes", "64KiB", "--repeat", "1"),
        # the readers check every page's stamp: one commit per request loses nothing
        *("--client", "commit_each_layer=false"),
    )
    assert report["settings"]["client_settings"] == {"commit_each_layer": "false"}
    assert {r["path"] for r in report["results"]} == {"shm", "tcp"}
    assert {r["op"] for r in report["results"]} == {"put", "get"}
    for row in report["results"]:
        assert (
            row["gbps"] > 0 and row["limit_gbps"] > 0 and row["bytes_short"] == 0 and row["wrong_stamps"] == 0
        )
    assert report["machine"]["cores"] >= 1 and report["limits"]["memcpy_gbps"] > 0
    assert np.isfinite(report["limits"]["loopback_gbps"])


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        ("bogus=1", "not a client setting: bogus"),
        ("port=1", "not a client setting: port"),  # a master setting
        ("commit_each_layer=maybe", "not a boolean"),
        ("commit_each_layer", "wants NAME=VALUE"),
    ],
)
def test_bench_rejects_bad_client_settings_before_any_run(setting, why):
    result = run_cli("bench", "--parts", "throughput", "--client", setting, timeout=60)
    assert result.returncode == 2 and why in result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "limits:" not in result.stdout


def test_bench_concurrent_writers_write_and_read_every_request(tmp_path):
    out = tmp_path / "bench.json"
    report = _bench_report(
        out,
        *("--parts", "throughput", "--paths", "shm", "--bytes", "16MiB", "--request-bytes", "2MiB"),
        *("--sizes", "64KiB", "--repeat", "1", "--writers", "3"),
    )
    assert report["settings"]["writers"] == 3
    assert {r["op"] for r in report["results"]} == {"put", "get"}
    for row in report["results"]:
        # every request written by one of the writers and read back, stamps intact
        assert row["gbps"] > 0 and row["bytes_short"] == 0 and row["wrong_stamps"] == 0, row


def test_bench_refuses_an_unwritable_json_path_before_any_run(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("bench", "--parts", "throughput", "--json", str(blocker / "bench.json"), timeout=60)
    assert result.returncode == 2 and "cannot write" in result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "limits:" not in result.stdout


def test_bench_other_parts_smoke(tmp_path):
    out = tmp_path / "bench.json"
    parts = "control,memory,latency" + (",redis" if shutil.which("redis-server") else "")
    report = _bench_report(
        out,
        *("--quick", "--parts", parts, "--paths", "shm", "--bytes", "16MiB", "--sizes", "64KiB"),
        *("--repeat", "1", "--memory-pages", "5000", "--latency-samples", "50"),
        timeout=300,
    )
    control = report["control"]
    assert control["pages"] == 2048 and control["put_layer_first"]["p50_ms"] > 0
    assert control["match_prefix"]["n"] == control["requests"]
    assert report["memory"]["pages"] == 5000 and report["memory"]["pages_in_master"] >= 5000
    assert [r["transport"] for r in report["latency"]] == ["shm"] and report["latency"][0]["get"][
        "p99_ms"
    ] > 0
    if "redis" in parts:
        assert {(r["path"], r["op"]) for r in report["results"]} == {("redis", "put"), ("redis", "get")}
        assert all(r["bytes_short"] == 0 for r in report["results"])


def test_up_refuses_a_port_in_use(shm_dir):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("up", "--port", str(port), "--dram", "16MiB", "--shm-dir", shm_dir, "--demo-exit")
    assert result.returncode == 1
    assert "in use" in result.stderr
    assert _pool_files(shm_dir) == []
