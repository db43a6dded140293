"""``kvstore up``: a whole single-machine cluster (master on the embedded backend + one DRAM node).

The processes are started by :class:`kvstore.testing.Cluster`, the same code the
tests use, so ``up`` and the test suite cannot drift apart.  SIGINT/SIGTERM
stop the node first, then the master, and ``up`` checks that no pool file of
its node is left in the shared-memory directory.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

import numpy as np

from kvstore import config as kvconfig
from kvstore.config import format_size
from kvstore.testing import Cluster, ClusterError, matched_tokens

DEMO_NAMESPACE = "demo-llama/bf16"
DEMO_LAYERS = 4
DEMO_PAGE = 16
DEMO_TOKENS = 64
DEMO_SHARED = 40  # the divergent prompt shares this many leading tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        dest="port",
        default=None,
        help="master gRPC port [KVSTORE_PORT; default 50051; 0: any free port]",
    )
    parser.add_argument(
        "--dram", dest="dram", default=None, help="DRAM of the node [KVSTORE_DRAM; default 1GiB]"
    )
    parser.add_argument(
        "--shm-dir",
        dest="shm_dir",
        default=None,
        help="directory of the node's pool file [KVSTORE_SHM_DIR; default /dev/shm]",
    )
    parser.add_argument(
        "--nvme",
        dest="nvme",
        default=None,
        help="NVMe tier of the node: SIZE:DIRECTORY [KVSTORE_NVME; default none]",
    )
    parser.add_argument("--demo", action="store_true", help="after start, write and read back a short prompt")
    parser.add_argument(
        "--demo-exit", action="store_true", help="with --demo: stop once the demo ran (for tests)"
    )


def run(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    if cfg.port and not _port_free("127.0.0.1", cfg.port):
        # gRPC binds with SO_REUSEPORT: a second master would share the port instead of failing
        print(
            f"kvstore up: 127.0.0.1:{cfg.port} is in use (another kvstore up?); pick --port", file=sys.stderr
        )
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    extra: dict[str, Any] = {"log_level": cfg.log_level}
    if cfg.nvme:  # tiers: a DRAM + NVMe node
        from kvstore.tiers.nvme import parse_spec

        try:
            extra["nvme"], extra["nvme_dir"] = parse_spec(cfg.nvme)
        except ValueError as exc:
            print(f"kvstore up: {exc}", file=sys.stderr)
            return 1
    # unique among the clusters sharing a shm dir, so `up` only ever judges (and sweeps) its own pool file
    node_id = f"{socket.gethostname()}-{cfg.port or secrets.token_hex(3)}"
    cluster = Cluster(
        1,
        dram=cfg.dram,
        shm_dir=cfg.shm_dir,
        port=cfg.port,
        host="127.0.0.1",
        grant_secret=secrets.token_hex(32),
        node_ids=[node_id],
        inherit_settings_env=True,  # KVSTORE_* settings (leases, watermarks...) reach the services
        extra_env={"KVSTORE_CONFIG": os.path.abspath(args.config)} if args.config else None,
        startup_timeout=60.0,
        **extra,
    )
    status = 0
    try:
        try:
            cluster.start()
        except ClusterError as exc:
            print(f"kvstore up: could not start the cluster: {exc}", file=sys.stderr)
            return 1
        address = cluster.master_address
        node = cluster.nodes[0]
        print(f"kvstore master listening on {address} (embedded metadata backend)")
        print(
            f"node {node.node_id}: {format_size(cluster.dram)} DRAM in {cluster.shm_dir}, data {node.data_address}"
        )
        print("use it:")
        print(
            f'  python -c \'from kvstore import KVStoreClient; c = KVStoreClient("{address}", namespace="my/model")\''
        )
        print(f"  kvstore --master {address} stats | nodes | namespaces | evict --all")
        print("stop with Ctrl-C (SIGINT) or SIGTERM", flush=True)
        if args.demo and not stop.is_set():
            try:
                ok = run_demo(address)
            except Exception as exc:  # noqa: BLE001 - report it and keep (or stop) serving
                print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                ok = False
            status = 0 if ok else 1
            if args.demo_exit:
                stop.set()
        while not stop.wait(0.5):
            cluster.check_alive()  # a dead child ends `up` with an error instead of serving half a cluster
    except ClusterError as exc:
        print(f"kvstore up: {exc}", file=sys.stderr)
        status = 1
    finally:
        try:
            cluster.stop(check=True)
            print(f"stopped; no pool files left in {cluster.shm_dir}", flush=True)
        except ClusterError as exc:
            print(f"kvstore up: {exc}", file=sys.stderr)
            status = 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def run_demo(address: str) -> bool:
    """Write a 64-token prompt's 4 layers, read it back with a fresh client, match a divergent prompt."""
    from kvstore.client import KVStoreClient

    rng = np.random.default_rng(2024)
    tokens = rng.integers(0, 128_000, DEMO_TOKENS, dtype=np.int64)
    writer = KVStoreClient(address, namespace=DEMO_NAMESPACE)
    writer.create_namespace(
        page_size=DEMO_PAGE, num_layers=DEMO_LAYERS, kind="mha", kv_heads=8, head_dim=128, dtype="bfloat16"
    )
    segment = 2 * 8 * DEMO_PAGE * 128 * 2
    pages = DEMO_TOKENS // DEMO_PAGE
    layers = [rng.integers(0, 256, (pages, segment), dtype=np.uint8) for _ in range(DEMO_LAYERS)]
    print(
        f"demo: namespace {DEMO_NAMESPACE}: {DEMO_PAGE}-token pages, {DEMO_LAYERS} layers, mha 8 heads x 128 bf16 "
        f"({format_size(segment)} per layer per page)"
    )
    started = time.perf_counter()
    written = [writer.put_layer(tokens, layer, kv) for layer, kv in enumerate(layers)]
    put_ms = (time.perf_counter() - started) * 1000
    print(
        f"demo: wrote a {DEMO_TOKENS}-token prompt, layer by layer: {written} pages per layer, "
        f"{format_size(sum(k.nbytes for k in layers))} in {put_ms:.1f} ms"
    )
    _close(writer)

    reader = KVStoreClient(address, namespace=DEMO_NAMESPACE)
    started = time.perf_counter()
    hit = reader.get_prefix(tokens)
    get_ms = (time.perf_counter() - started) * 1000
    same = hit.num_pages == pages and all(
        np.array_equal(np.asarray(hit.layer(i)).view(np.uint8).reshape(pages, -1), layers[i])
        for i in range(DEMO_LAYERS)
    )
    print(
        f"demo: a fresh client read back {hit.num_pages} pages x {DEMO_LAYERS} layers in {get_ms:.1f} ms: "
        f"bytes {'identical' if same else 'DIFFERENT'}"
    )
    divergent = tokens.copy()
    divergent[DEMO_SHARED:] = rng.integers(0, 128_000, DEMO_TOKENS - DEMO_SHARED)
    matched = matched_tokens(reader.match_prefix(divergent), DEMO_PAGE)
    expected = DEMO_SHARED // DEMO_PAGE * DEMO_PAGE
    print(
        f"demo: a prompt sharing the first {DEMO_SHARED} tokens matches {matched} tokens "
        f"({matched // DEMO_PAGE} full pages; the page holding the divergence is not shared)"
    )
    _close(reader)
    return same and matched == expected


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        close()
