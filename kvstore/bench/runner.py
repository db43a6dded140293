"""``kvstore bench``: put and get throughput per (data path, segment size), beside measured physical limits.

The writer and the reader are separate spawned processes (as a prefill and a
decode would be), talking to a cluster this command starts with the test
harness, or to ``--master`` when given.  Each (path, size) is measured
``--repeat`` times on fresh prompts and the median is reported; between runs
the namespace is evicted so the node's DRAM always holds the working set.
``--warmup`` unmeasured rounds come first: a process's first touch of a page of
the shared pool mapping costs a page fault (about 5x a warm copy), which a
long-lived engine pays once; the warm-up numbers are kept in the JSON.
GB/s are 1e9 bytes per second of client-call time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import secrets
import statistics
import sys
import time
from typing import Any

from kvstore import config as kvconfig
from kvstore._proto import kvstore_pb2 as pb
from kvstore.bench import limits
from kvstore.bench.workers import Workload, get_run, put_run
from kvstore.cli.output import render_table
from kvstore.config import format_size, parse_size
from kvstore.errors import KVStoreError
from kvstore.layout import align_up
from kvstore.testing import Cluster, process_pool, submit, wait_for

PATHS = ("shm", "tcp")
MAX_NODE_DRAM = 4 << 30
RUN_TIMEOUT_S = 600.0
ROOM_TIMEOUT_S = 120.0  # evicted slots return after the cluster's quarantine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", default="64KiB,1MiB", help="segment sizes, comma separated (default 64KiB,1MiB)"
    )
    parser.add_argument(
        "--bytes",
        dest="total_bytes",
        default=None,
        help="bytes moved per run and op (default 1GiB; --quick: 256MiB)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="256 MiB per run: a check that takes well under a minute"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured rounds first (map the pool pages in each process)"
    )
    parser.add_argument("--paths", default="shm,tcp", help="data paths to measure: shm, tcp (default both)")
    parser.add_argument("--layers", type=int, default=4, help="layers per page (default 4)")
    parser.add_argument("--page-tokens", type=int, default=16, help="tokens per page (default 16)")
    parser.add_argument("--request-bytes", default="64MiB", help="bytes of one request (all its layers)")
    parser.add_argument(
        "--json", dest="json_file", metavar="FILE", help="also write results and machine info here"
    )


def _node_dram(total: int, sizes: list[int], layers: int) -> int:
    """DRAM that holds one run's pages below the default low watermark (0.85), with room for arena rounding."""
    biggest = max(align_up(layers * size) * math.ceil(total / (layers * size)) for size in sizes)
    return min(MAX_NODE_DRAM, align_up(int(biggest / 0.8) + (64 << 20), 16 << 20))


def _make_room(admin_call: Any, namespace: str, run_bytes: int, timeout: float) -> None:
    """Evict the namespace, then wait until some node has room for the next run.

    Evicted slots sit out the quarantine (on a cluster started with defaults, a
    whole write lease) before they can be allocated again.
    """
    admin_call("Evict", pb.EvictRequest(namespace=namespace))

    def room() -> bool:
        stats = admin_call("ClusterStats", pb.ClusterStatsRequest())
        if any(ns.name == namespace and ns.pages for ns in stats.namespaces):
            return False
        free = [
            t.capacity_bytes - t.allocated_bytes - t.quarantined_bytes
            for n in stats.nodes
            if n.alive
            for t in n.tiers
        ]
        return bool(free) and max(free) >= run_bytes

    wait_for(room, timeout, f"room for {format_size(run_bytes)} after evicting {namespace} (quarantine)")


def run(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    total = parse_size(args.total_bytes or ("256MiB" if args.quick else "1GiB"))
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not sizes or any(p not in PATHS for p in paths) or args.repeat < 1 or args.warmup < 0:
        print(
            f"kvstore bench: --paths must name some of {PATHS}, --sizes at least one size, --repeat >= 1",
            file=sys.stderr,
        )
        return 2
    request_bytes = parse_size(args.request_bytes)
    external = getattr(args, "master", None)
    machine = limits.machine_info()
    print(
        f"kvstore bench: {format_size(total)} per run, segments {', '.join(format_size(s) for s in sizes)}, "
        f"{args.layers} layers x {args.page_tokens} tokens per page, median of {args.repeat} after {args.warmup} warm-up round(s)"
    )
    print(
        f"machine: {machine['cpu_model']}, {machine['cores_usable']} cores, "
        f"{format_size(machine['memory_bytes'] or 0)} memory, Python {machine['python']}, kernel {machine['kernel']}"
    )

    memcpy = limits.memcpy_gbps(256 << 20, args.repeat)
    loopback = limits.loopback_gbps(max(total, 256 << 20), args.repeat)
    physical = {**memcpy, "loopback_gbps": loopback}
    print(
        f"limits: single-thread memcpy {memcpy['memcpy_gbps']:.2f} GB/s "
        f"(numpy {memcpy['memcpy_numpy_gbps']:.2f}, native {memcpy['memcpy_native_gbps']:.2f}), "
        f"loopback TCP process->process {loopback:.2f} GB/s",
        flush=True,
    )
    limit_of = {"shm": memcpy["memcpy_gbps"], "tcp": loopback}

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    with contextlib.ExitStack() as stack:
        if external:
            master = external
            admin_call = _admin_caller(master, cfg)
        else:
            dram = _node_dram(total, sizes, args.layers)
            cluster = stack.enter_context(
                Cluster(
                    1,
                    dram=dram,
                    read_lease_ms=30_000,
                    write_lease_ms=30_000,
                    quarantine_ms=200,
                    heartbeat_ms=500,
                    node_ttl_ms=10_000,
                    startup_timeout=120.0,
                )
            )
            master = cluster.master_address
            admin_call = _cluster_caller(cluster)
            print(f"cluster: master {master}, one node with {format_size(dram)} DRAM", flush=True)
        writer = stack.enter_context(process_pool(1))
        reader = stack.enter_context(process_pool(1))
        for path in paths:
            for size in sizes:
                page_bytes = args.layers * size
                per_request = max(1, min(request_bytes, total) // page_bytes)
                requests = max(1, math.ceil(total / (per_request * page_bytes)))
                namespace = f"bench/{path}-{size}-{secrets.token_hex(3)}"
                runs: dict[str, list[dict[str, Any]]] = {"put": [], "get": []}
                warm: dict[str, list[dict[str, Any]]] = {"put": [], "get": []}
                for run_index in range(args.warmup + args.repeat):
                    kept = runs if run_index >= args.warmup else warm
                    work = Workload(
                        master,
                        namespace,
                        path,
                        size,
                        args.layers,
                        args.page_tokens,
                        per_request,
                        requests,
                        run_index,
                    )
                    try:
                        kept["put"].append(submit(writer, put_run, work).result(RUN_TIMEOUT_S))
                        kept["get"].append(submit(reader, get_run, work).result(RUN_TIMEOUT_S))
                        run_bytes = requests * per_request * align_up(page_bytes)
                        _make_room(admin_call, namespace, run_bytes, ROOM_TIMEOUT_S)
                    except (KVStoreError, TimeoutError) as exc:
                        errors.append(f"{path} {format_size(size)}: {exc}")
                        print(f"  {path} {format_size(size)}: failed: {exc}", file=sys.stderr, flush=True)
                        break
                for op in ("put", "get"):
                    if runs[op]:
                        row = _summarise(path, size, op, runs[op], limit_of[path])
                        row["warmup_gbps"] = [_rate(r) for r in warm[op]]
                        results.append(row)
                        print(
                            f"  {path:3s} {format_size(size):>9s} {op}: {row['gbps']:.2f} GB/s "
                            f"({row['ratio']:.0%} of {row['limit_gbps']:.2f})",
                            flush=True,
                        )

    print()
    print(
        render_table(
            ["path", "size", "op", "GB/s", "limit GB/s", "ratio"],
            [
                [
                    r["path"],
                    format_size(r["size"]),
                    r["op"],
                    f"{r['gbps']:.2f}",
                    f"{r['limit_gbps']:.2f}",
                    f"{r['ratio']:.2f}",
                ]
                for r in results
            ],
            right=(1, 3, 4, 5),
        )
    )
    short = [r for r in results if r["bytes_short"] or r.get("wrong_stamps")]
    for r in short:
        print(
            f"warning: {r['path']} {format_size(r['size'])} {r['op']}: {r['bytes_short']} bytes short of the "
            f"target, {r.get('wrong_stamps', 0)} pages with wrong bytes",
            file=sys.stderr,
        )
    if args.json_file:
        report = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine,
            "limits": physical,
            "settings": {
                "bytes_per_run": total,
                "sizes": sizes,
                "repeat": args.repeat,
                "warmup": args.warmup,
                "paths": paths,
                "layers": args.layers,
                "page_tokens": args.page_tokens,
                "request_bytes": request_bytes,
                "external_master": bool(external),
            },
            "results": results,
            "errors": errors,
        }
        with open(args.json_file, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json_file}")
    return 1 if errors or any(r.get("wrong_stamps") for r in results) else 0


def _summarise(path: str, size: int, op: str, runs: list[dict[str, Any]], limit: float) -> dict[str, Any]:
    rates = [_rate(r) for r in runs]
    gbps = statistics.median(rates)
    return {
        "path": path,
        "size": size,
        "op": op,
        "gbps": gbps,
        "limit_gbps": limit,
        "ratio": gbps / limit if limit else 0.0,
        "runs_gbps": rates,
        "bytes": runs[0]["expected_bytes"],
        "bytes_short": max(r["expected_bytes"] - r["bytes"] for r in runs),
        "wrong_stamps": sum(r.get("wrong_stamps", 0) for r in runs),
    }


def _rate(run: dict[str, Any]) -> float:
    return run["bytes"] / run["seconds"] / 1e9 if run["seconds"] > 0 else 0.0


def _cluster_caller(cluster: Cluster) -> Any:
    def call(method: str, request: Any) -> Any:
        return cluster.call(getattr(cluster.admin, method), request)

    return call


def _admin_caller(master: str, cfg: kvconfig.Config) -> Any:
    from kvstore.cli.admin import Master

    connection = Master(cfg.replace(master=master))

    def call(method: str, request: Any) -> Any:
        return connection.admin(method, request)

    return call
