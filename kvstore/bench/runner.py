"""``kvstore bench``: the store's speed beside the machine's limits, measured in the same run.

Parts (``--parts``, default all):

* ``throughput``: put and get GB/s per (data path, segment size).  The writer
  and the reader are separate spawned processes (as a prefill and a decode
  would be), talking to a cluster this command starts with the test harness,
  or to ``--master`` when given.  Each (path, size) is measured ``--repeat``
  times on fresh prompts and the median is reported; between runs the
  namespace is evicted so the node's DRAM always holds the working set.
  ``--warmup`` unmeasured rounds come first: a process's first touch of a page
  of the shared pool mapping costs a page fault (about 5x a warm copy), which a
  long-lived engine pays once; the warm-up numbers are kept in the JSON.
* ``redis``: the same bytes through redis-server (started and stopped here),
  pipelined, with redis-py and hiredis; compared with kvstore's shm and tcp.
* ``control``: put_layer of 2048 pages x 32 layers, layer by layer, and the
  lookups of the same prompt (match_prefix, acquire_prefix): latency beyond
  the data copy.
* ``memory``: a fresh master's RSS growth per page while it indexes 1,000,000
  pages of 32 layers (``--quick``: 100,000).
* ``latency``: get_prefix of one 4 KiB segment, p50 and p99, per path.
* ``streaming``: a writer process puts 32 layers while a reader process streams
  them (get_prefix_stream, shm): how long after the last layer's commit the
  reader has every layer, beside one layer's read time (kvstore.bench.streaming).
* ``tiers``: NVMe tier write/read GB/s (4 MiB and 64 KiB segments) beside raw
  file I/O in the same directory, and demotion throughput (kvstore.bench.tiers;
  ``--tier-dir`` picks the directory, default the temp directory).

GB/s are 1e9 bytes per second of client-call time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kvstore import config as kvconfig
from kvstore._proto import kvstore_pb2 as pb
from kvstore.bench import limits, redis_bench
from kvstore.bench.workers import (
    ControlWorkload,
    LatencyWorkload,
    Workload,
    control_run,
    get_run,
    latency_run,
    put_run,
)
from kvstore.cli.output import render_table
from kvstore.config import format_size, parse_size
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.layout import align_up
from kvstore.testing import Cluster, process_pool, submit, wait_for

PATHS = ("shm", "tcp")
PARTS = ("throughput", "redis", "control", "memory", "latency", "streaming", "tiers")
MAX_NODE_DRAM = 4 << 30
RUN_TIMEOUT_S = 600.0
ROOM_TIMEOUT_S = 120.0  # evicted slots return after the cluster's quarantine
CONTROL_PAGES = 2048  # a 32k-token prompt of 16-token pages
CONTROL_LAYERS = 32
CONTROL_SEGMENT = 512  # bytes: the control plane does not care, and the run stays small
LATENCY_SEGMENT = 4096
MEMORY_LAYERS = 32
CONTROL_REQUESTS_MAX = 8

Caller = Callable[[str, Any], Any]


def client_settings(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """``--client NAME=VALUE`` pairs, checked against the settings table."""
    pairs = []
    for item in args.client_settings:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"--client wants NAME=VALUE, got {item!r}")
        pairs.append((name.strip(), value.strip()))
    known = {s.name for s in kvconfig.SETTINGS if kvconfig.CLIENT in s.components}
    unknown = sorted(name for name, _ in pairs if name not in known)
    if unknown:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT, f"--client: not a client setting: {', '.join(unknown)}"
        )
    try:
        kvconfig.load(dict(pairs), environ={})  # bad values fail here, before any run
    except SystemExit as exc:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"--client: {exc}") from None
    return tuple(pairs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"what to measure, comma separated: {', '.join(PARTS)} (default all)",
    )
    parser.add_argument(
        "--sizes",
        default="64KiB,1MiB,4MiB",
        help="segment sizes of the throughput and redis parts (default 64KiB,1MiB,4MiB)",
    )
    parser.add_argument(
        "--bytes",
        dest="total_bytes",
        default=None,
        help="bytes moved per run and op (default 1GiB; --quick: 256MiB)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small runs of every part: a check that finishes in under a minute",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured rounds first (map the pool pages in each process)"
    )
    parser.add_argument("--paths", default="shm,tcp", help="data paths to measure: shm, tcp (default both)")
    parser.add_argument(
        "--layers", type=int, default=4, help="layers per page of the throughput part (default 4)"
    )
    parser.add_argument("--page-tokens", type=int, default=16, help="tokens per page (default 16)")
    parser.add_argument(
        "--writers",
        type=int,
        default=1,
        help="throughput part: concurrent writer processes (and as many readers), each with its share of "
        "the requests; above 1, GB/s is all their bytes over the wall time from the first start to the last end",
    )
    parser.add_argument(
        "--client",
        dest="client_settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a client setting of the throughput part's writer and reader (kvstore config), e.g. "
        "commit_each_layer=false; repeatable",
    )
    parser.add_argument("--request-bytes", default="64MiB", help="bytes of one request (all its layers)")
    parser.add_argument(
        "--open-ahead",
        action="store_true",
        help="throughput part: each writer opens its next request's put (KVStoreClient.open_put) "
        "after the current request's first layer, as a scheduler that knows its next request would",
    )
    parser.add_argument(
        "--memory-pages",
        type=int,
        default=None,
        help="pages of the memory part (default 1000000; --quick 100000)",
    )
    parser.add_argument(
        "--latency-samples", type=int, default=None, help="gets per path of the latency part (default 3000)"
    )
    parser.add_argument(
        "--json", dest="json_file", metavar="FILE", help="also write results and machine info here"
    )
    parser.add_argument(
        "--tier-dir", default=None, help="directory of the tiers part's NVMe files (default: temp)"
    )


def _node_dram(total: int, sizes: list[int], layers: int) -> int:
    """DRAM that holds one run's pages below the default low watermark (0.85), with room for arena rounding."""
    biggest = max(align_up(layers * size) * math.ceil(total / (layers * size)) for size in sizes)
    control = (CONTROL_REQUESTS_MAX + 1) * CONTROL_PAGES * align_up(CONTROL_LAYERS * CONTROL_SEGMENT)
    return min(MAX_NODE_DRAM, align_up(int(max(biggest, control) / 0.8) + (64 << 20), 16 << 20))


def _make_room(admin_call: Caller, namespace: str, run_bytes: int, timeout: float) -> None:
    """Evict the namespace, then wait until some node has room for the next run.

    Evicted slots sit out the quarantine (on a cluster started with defaults, a
    whole write lease) before they can be allocated again.  Pages still under a
    lease are skipped by an eviction (get_prefix releases its own lease without
    waiting for the answer, so the reader's last one may land just after): the
    eviction is repeated until none are left.
    """
    admin_call("Evict", pb.EvictRequest(namespace=namespace))

    def room() -> bool:
        stats = admin_call("ClusterStats", pb.ClusterStatsRequest())
        if any(ns.name == namespace and ns.pages for ns in stats.namespaces):
            admin_call("Evict", pb.EvictRequest(namespace=namespace))
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
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    try:
        client_settings(args)
    except KVStoreError as exc:
        print(f"kvstore bench: {exc.message}", file=sys.stderr)
        return 2
    if (
        not sizes
        or any(p not in PATHS for p in paths)
        or any(p not in PARTS for p in parts)
        or args.repeat < 1
        or args.warmup < 0
        or not 1 <= args.writers <= 16
    ):
        print(
            f"kvstore bench: --paths must name some of {PATHS}, --parts some of {PARTS}, "
            "--sizes at least one size, --repeat >= 1, --writers 1 to 16",
            file=sys.stderr,
        )
        return 2
    if args.json_file:
        # a bench takes a minute or more: a path that cannot be written fails now, not at the end
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_file)), exist_ok=True)
            with open(args.json_file, "a"):
                pass
        except OSError as exc:
            print(f"kvstore bench: cannot write {args.json_file}: {exc}", file=sys.stderr)
            return 2
    request_bytes = parse_size(args.request_bytes)
    external = getattr(args, "master", None)
    machine = limits.machine_info()
    started_at = time.monotonic()
    print(
        f"kvstore bench: parts {', '.join(parts)}; {format_size(total)} per run, segments "
        f"{', '.join(format_size(s) for s in sizes)}, {args.layers} layers x {args.page_tokens} tokens per page, "
        f"median of {args.repeat} after {args.warmup} warm-up round(s)"
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
        f"(the native engine's streaming-store copy, one thread: {memcpy['stream_copy_gbps']:.2f}), "
        f"loopback TCP process->process {loopback:.2f} GB/s",
        flush=True,
    )
    limit_of = {"shm": memcpy["memcpy_gbps"], "tcp": loopback, "redis": loopback}

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    report: dict[str, Any] = {}
    needs_cluster = any(p in parts for p in ("throughput", "control", "latency", "streaming"))
    with contextlib.ExitStack() as stack:
        master = ""
        admin_call: Caller | None = None
        if needs_cluster and external:
            master = external
            admin_call = _admin_caller(master, cfg)
        elif needs_cluster:
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
        # the throughput part's extra writers and readers (--writers): a process each
        writers = [writer] + [stack.enter_context(process_pool(1)) for _ in range(args.writers - 1)]
        readers = [reader] + [stack.enter_context(process_pool(1)) for _ in range(args.writers - 1)]

        if "throughput" in parts:
            assert admin_call is not None
            for path in paths:
                for size in sizes:
                    row_pair = _throughput(
                        args, path, size, total, request_bytes, master, admin_call, writers, readers, errors
                    )
                    for row in row_pair:
                        row["limit_gbps"] = limit_of[path]
                        row["ratio"] = row["gbps"] / limit_of[path] if limit_of[path] else 0.0
                        results.append(row)
                        print(
                            f"  {path:5s} {format_size(size):>9s} {row['op']}: {row['gbps']:.2f} GB/s "
                            f"({row['ratio']:.0%} of {row['limit_gbps']:.2f})",
                            flush=True,
                        )

        if "redis" in parts:
            report["redis"] = _redis_part(args, sizes, total, request_bytes, writer, reader, errors)
            for row in report["redis"].get("results", []):
                row["limit_gbps"] = limit_of["redis"]
                row["ratio"] = row["gbps"] / limit_of["redis"] if limit_of["redis"] else 0.0
                results.append(row)

        if "control" in parts:
            assert admin_call is not None
            requests = 3 if args.quick else CONTROL_REQUESTS_MAX
            work = ControlWorkload(
                master,
                f"bench/control-{secrets.token_hex(3)}",
                CONTROL_PAGES,
                CONTROL_LAYERS,
                CONTROL_SEGMENT,
                requests,
            )
            try:
                report["control"] = submit(writer, control_run, work).result(RUN_TIMEOUT_S)
                admin_call("Evict", pb.EvictRequest(namespace=work.namespace))
                _print_control(report["control"])
            except (KVStoreError, TimeoutError, RuntimeError) as exc:
                errors.append(f"control: {exc}")
                print(f"  control: failed: {exc}", file=sys.stderr, flush=True)

        if "latency" in parts:
            samples = args.latency_samples or (300 if args.quick else 3000)
            report["latency"] = []
            for path in paths:
                lat = LatencyWorkload(
                    master, f"bench/latency-{path}-{secrets.token_hex(3)}", path, LATENCY_SEGMENT, samples
                )
                try:
                    got = submit(reader, latency_run, lat).result(RUN_TIMEOUT_S)
                except (KVStoreError, TimeoutError, RuntimeError) as exc:
                    errors.append(f"latency {path}: {exc}")
                    print(f"  latency {path}: failed: {exc}", file=sys.stderr, flush=True)
                    continue
                report["latency"].append(got)
                print(
                    f"  latency {path}: get of one {format_size(LATENCY_SEGMENT)} segment "
                    f"p50 {got['get']['p50_ms']:.3f} ms, p99 {got['get']['p99_ms']:.3f} ms",
                    flush=True,
                )

        if "streaming" in parts:
            from kvstore.bench.streaming import run_streaming

            try:
                namespace = f"bench/streaming-{secrets.token_hex(3)}"
                report["streaming"] = run_streaming(
                    master, namespace, writer, reader, args.quick, RUN_TIMEOUT_S
                )
                st = report["streaming"]
                print(
                    f"  streaming: {st['layers']} layers of {format_size(st['layer_bytes'])}: reader has all "
                    f"{st['lag_after_last_commit_ms']:.2f} ms after the last commit; one layer's read "
                    f"{st['one_layer_read_ms']:.2f} ms",
                    flush=True,
                )
            except (KVStoreError, TimeoutError, RuntimeError) as exc:
                errors.append(f"streaming: {exc}")
                print(f"  streaming: failed: {exc}", file=sys.stderr, flush=True)

    if "tiers" in parts:
        from kvstore.bench.tiers import run_tiers

        try:
            report["tiers"] = run_tiers(args.tier_dir, args.quick)
        except (KVStoreError, TimeoutError, RuntimeError, OSError) as exc:
            errors.append(f"tiers: {exc}")
            print(f"  tiers: failed: {exc}", file=sys.stderr, flush=True)

    if "memory" in parts:
        from kvstore.bench.memory import master_memory

        pages = args.memory_pages or (100_000 if args.quick else 1_000_000)
        try:
            report["memory"] = master_memory(pages, layers=MEMORY_LAYERS)
            mem = report["memory"]
            print(
                f"  memory: {mem['pages']:,} pages of {MEMORY_LAYERS} layers: master RSS "
                f"+{format_size(mem['rss_after_bytes'] - mem['rss_before_bytes'])}, "
                f"{mem['bytes_per_page']:.0f} bytes per page",
                flush=True,
            )
        except (KVStoreError, TimeoutError, RuntimeError, OSError) as exc:
            errors.append(f"memory: {exc}")
            print(f"  memory: failed: {exc}", file=sys.stderr, flush=True)

    _print_summary(results, report)
    short = [r for r in results if r.get("bytes_short") or r.get("wrong_stamps")]
    for r in short:
        print(
            f"warning: {r['path']} {format_size(r['size'])} {r['op']}: {r['bytes_short']} bytes short of the "
            f"target, {r.get('wrong_stamps', 0)} pages with wrong bytes",
            file=sys.stderr,
        )
    elapsed = time.monotonic() - started_at
    print(f"bench took {elapsed:.0f} s")
    if args.json_file:
        out = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["kvstore", *sys.argv[1:]]) if sys.argv else "kvstore bench",
            "elapsed_s": elapsed,
            "machine": machine,
            "limits": physical,
            "settings": {
                "parts": parts,
                "bytes_per_run": total,
                "sizes": sizes,
                "repeat": args.repeat,
                "warmup": args.warmup,
                "paths": paths,
                "layers": args.layers,
                "page_tokens": args.page_tokens,
                "writers": args.writers,
                "request_bytes": request_bytes,
                "open_ahead": bool(args.open_ahead),
                "quick": bool(args.quick),
                "external_master": bool(external),
                "client_settings": dict(client_settings(args)),
            },
            "results": results,
            **report,
            "errors": errors,
        }
        with open(args.json_file, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"wrote {args.json_file}")
    return 1 if errors or any(r.get("wrong_stamps") for r in results) else 0


# ---------------------------------------------------------------- parts


def _throughput(
    args: argparse.Namespace,
    path: str,
    size: int,
    total: int,
    request_bytes: int,
    master: str,
    admin_call: Caller,
    writers: list[Any],
    readers: list[Any],
    errors: list[str],
) -> list[dict[str, Any]]:
    page_bytes = args.layers * size
    per_request = max(1, min(request_bytes, total) // page_bytes)
    requests = max(1, math.ceil(total / (per_request * page_bytes)))
    namespace = f"bench/{path}-{size}-{secrets.token_hex(3)}"
    runs: dict[str, list[dict[str, Any]]] = {"put": [], "get": []}
    warm: dict[str, list[dict[str, Any]]] = {"put": [], "get": []}
    for run_index in range(args.warmup + args.repeat):
        kept = runs if run_index >= args.warmup else warm
        # each worker's share of the requests
        shares = [requests // len(writers) + (i < requests % len(writers)) for i in range(len(writers))]
        works = [
            Workload(
                master,
                namespace,
                path,
                size,
                args.layers,
                args.page_tokens,
                per_request,
                share,
                run_index,
                client_settings(args),
                first_request=sum(shares[:i]),
                open_ahead=bool(args.open_ahead),
            )
            for i, share in enumerate(shares)
            if share
        ]
        try:
            for op, pools, fn in (("put", writers, put_run), ("get", readers, get_run)):
                futures = [submit(pool, fn, work) for pool, work in zip(pools, works, strict=False)]
                kept[op].append(_concurrent([f.result(RUN_TIMEOUT_S) for f in futures]))
            run_bytes = requests * per_request * align_up(page_bytes)
            _make_room(admin_call, namespace, run_bytes, ROOM_TIMEOUT_S)
        except (KVStoreError, TimeoutError) as exc:
            errors.append(f"{path} {format_size(size)}: {exc}")
            print(f"  {path} {format_size(size)}: failed: {exc}", file=sys.stderr, flush=True)
            break
    rows = []
    for op in ("put", "get"):
        if runs[op]:
            row = _summarise(path, size, op, runs[op])
            row["warmup_gbps"] = [_rate(r) for r in warm[op]]
            row["requests_per_run"] = requests
            row["pages_per_request"] = per_request
            rows.append(row)
    return rows


def _redis_part(
    args: argparse.Namespace,
    sizes: list[int],
    total: int,
    request_bytes: int,
    writer: Any,
    reader: Any,
    errors: list[str],
) -> dict[str, Any]:
    binary = redis_bench.find_redis_server()
    if binary is None:
        errors.append("redis: redis-server not found (make setup installs it)")
        print("  redis: redis-server not found; skipped", file=sys.stderr, flush=True)
        return {}
    try:
        parser = redis_bench.parser_name()
    except ImportError:
        errors.append("redis: redis-py is not installed (pip install -e '.[dev]')")
        print("  redis: redis-py not installed; skipped", file=sys.stderr, flush=True)
        return {}
    out: dict[str, Any] = {"binary": binary, "parser": parser, "results": []}
    with redis_bench.redis_server(binary) as (port, version):
        out["version"] = version
        print(f"  redis {version} on port {port} ({parser} parser), no persistence", flush=True)
        for size in sizes:
            per_request = max(1, min(request_bytes, total) // size)
            requests = max(1, math.ceil(total / (per_request * size)))
            runs: dict[str, list[dict[str, Any]]] = {"put": [], "get": []}
            for run_index in range(args.warmup + args.repeat):
                work = redis_bench.RedisWorkload(port, size, per_request, requests, run_index)
                try:
                    put = submit(writer, redis_bench.put_run, work).result(RUN_TIMEOUT_S)
                    get = submit(reader, redis_bench.get_run, work).result(RUN_TIMEOUT_S)
                except (TimeoutError, OSError, RuntimeError) as exc:
                    errors.append(f"redis {format_size(size)}: {exc}")
                    break
                finally:
                    redis_bench.flush(port)
                if run_index >= args.warmup:
                    runs["put"].append({**put, "expected_bytes": requests * per_request * size})
                    runs["get"].append({**get, "expected_bytes": requests * per_request * size})
            for op in ("put", "get"):
                if runs[op]:
                    row = _summarise("redis", size, op, runs[op])
                    out["results"].append(row)
                    print(f"  redis {format_size(size):>9s} {op}: {row['gbps']:.2f} GB/s", flush=True)
    return out


# ---------------------------------------------------------------- output


def _print_control(ctl: dict[str, Any]) -> None:
    def p50(name: str) -> float:
        return float(ctl[name].get("p50_ms", float("nan")))

    rpc = ctl.get("rpc", {})
    print(
        f"  control: {ctl['pages']} pages x {ctl['layers']} layers: put_layer beyond the copy p50 "
        f"first {p50('beyond_copy_first'):.2f} ms (OpenPut {rpc.get('OpenPut', {}).get('p50_ms', float('nan')):.2f}; "
        f"opened ahead {p50('beyond_copy_first_opened_ahead'):.2f}), "
        f"middle {p50('beyond_copy_middle'):.2f} ms, last {p50('beyond_copy_last'):.2f} ms, "
        f"per layer {p50('beyond_copy_per_layer'):.2f} ms; match_prefix {p50('match_prefix'):.2f} ms, "
        f"acquire_prefix {p50('acquire_prefix'):.2f} ms",
        flush=True,
    )


def _print_summary(results: list[dict[str, Any]], report: dict[str, Any]) -> None:
    if results:
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
    redis_rows = {(r["size"], r["op"]): r["gbps"] for r in report.get("redis", {}).get("results", [])}
    if redis_rows:
        ours = {(r["path"], r["size"], r["op"]): r["gbps"] for r in results if r["path"] in PATHS}
        rows = []
        for (size, op), base in sorted(redis_rows.items()):
            cells = [format_size(size), op, f"{base:.2f}"]
            for path in PATHS:
                mine = ours.get((path, size, op))
                cells.append(f"{mine / base:.1f}x" if mine and base else "-")
            rows.append(cells)
        print()
        print(
            render_table(
                ["size", "op", "redis GB/s", "shm vs redis", "tcp vs redis"], rows, right=(0, 2, 3, 4)
            )
        )
    ctl = report.get("control")
    if ctl:
        print()
        names = [
            ("put_layer, first layer (OpenPut + copy + commit sent), beyond the copy", "beyond_copy_first"),
            (
                "put_layer, first layer, its put opened ahead (open_put), beyond the copy",
                "beyond_copy_first_opened_ahead",
            ),
            ("put_layer, middle layer (copy + commit sent), beyond the copy", "beyond_copy_middle"),
            ("put_layer, last layer (waits for the commits), beyond the copy", "beyond_copy_last"),
            ("put of all layers beyond the copies, per layer", "beyond_copy_per_layer"),
            ("match_prefix (hash keys + RPC)", "match_prefix"),
            ("acquire_prefix (hash keys + RPC + lease + grants)", "acquire_prefix"),
        ]
        rows = [[label, f"{ctl[key]['p50_ms']:.2f}", f"{ctl[key]['p99_ms']:.2f}"] for label, key in names]
        for method, summary in sorted(ctl.get("rpc", {}).items()):
            rows.append([f"RPC {method}", f"{summary['p50_ms']:.2f}", f"{summary['p99_ms']:.2f}"])
        print(f"control plane, {ctl['pages']} pages x {ctl['layers']} layers, {ctl['requests']} requests:")
        print(render_table(["what", "p50 ms", "p99 ms"], rows, right=(1, 2)))
    lat = report.get("latency")
    if lat:
        print()
        print(
            render_table(
                ["path", "op", "segment", "p50 ms", "p99 ms"],
                [
                    [
                        r["transport"],
                        op,
                        format_size(r["segment_bytes"]),
                        f"{r[op]['p50_ms']:.3f}",
                        f"{r[op]['p99_ms']:.3f}",
                    ]
                    for r in lat
                    for op in ("get", "put")
                ],
                right=(3, 4),
            )
        )
    mem = report.get("memory")
    if mem:
        print()
        print(
            f"master memory: {mem['pages']:,} pages x {mem['layers']} layers, RSS "
            f"{format_size(mem['rss_before_bytes'])} -> {format_size(mem['rss_after_bytes'])}: "
            f"{mem['bytes_per_page']:.0f} bytes per page"
        )


def _summarise(path: str, size: int, op: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [_rate(r) for r in runs]
    return {
        "path": path,
        "size": size,
        "op": op,
        "gbps": statistics.median(rates),
        "runs_gbps": rates,
        "bytes": runs[0]["expected_bytes"],
        "bytes_short": max(r["expected_bytes"] - r["bytes"] for r in runs),
        "wrong_stamps": sum(r.get("wrong_stamps", 0) for r in runs),
    }


def _concurrent(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run of several concurrent workers: their bytes over the wall time they spanned together."""
    if len(runs) == 1:
        return runs[0]
    return {
        "seconds": max(r["span"][1] for r in runs) - min(r["span"][0] for r in runs),
        "bytes": sum(r["bytes"] for r in runs),
        "expected_bytes": sum(r["expected_bytes"] for r in runs),
        "wrong_stamps": sum(r.get("wrong_stamps", 0) for r in runs),
        "workers": len(runs),
    }


def _rate(run: dict[str, Any]) -> float:
    return run["bytes"] / run["seconds"] / 1e9 if run["seconds"] > 0 else 0.0


def _cluster_caller(cluster: Cluster) -> Caller:
    def call(method: str, request: Any) -> Any:
        return cluster.call(getattr(cluster.admin, method), request)

    return call


def _admin_caller(master: str, cfg: kvconfig.Config) -> Caller:
    from kvstore.cli.admin import Master

    connection = Master(cfg.replace(master=master))

    def call(method: str, request: Any) -> Any:
        return connection.admin(method, request)

    return call
