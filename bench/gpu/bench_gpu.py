"""GPU data plane benchmark (issue 5): put_layer / get_prefix GB/s with GPU tensors vs single copies.

Runs a one-node cluster (kvstore.testing.Cluster), a writer and a reader in
separate spawned processes, and in the reader's process the baselines: one
1 GiB cudaMemcpy between the GPU and pinned memory (cudaHostAlloc), the same
into the node's registered pool mapping, 16384 separate 64 KiB cudaMemcpyAsync
calls, and the bare gather/scatter kernel over the same 16384 segments.
Medians of ``--reps`` runs; JSON on stdout (and in ``--json``).

    source bench/gpu/prepare.sh && python bench/gpu/bench_gpu.py --json $OUT/bench_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kvstore.testing import Cluster, process_pool, prompt  # noqa: E402

PAGE = 16
KV_HEADS = 8
HEAD_DIM = 128  # bf16: 2 x 8 x 16 x 128 x 2 = 64 KiB segments
NAMESPACE = "bench/gpu"


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _gpu_tensor(lib: str, pages: int, seg: int, fill: bool) -> Any:
    if lib == "torch":
        import torch

        t = torch.empty((pages, seg // 2), dtype=torch.bfloat16, device="cuda")
        if fill:
            t.view(torch.int16).random_(-(2**15), 2**15 - 1)
        return t
    import cupy

    t = cupy.empty((pages, seg), dtype=cupy.uint8)
    if fill:
        t[...] = cupy.random.randint(0, 256, t.shape, dtype=cupy.uint8)
    return t


def _sync(lib: str) -> None:
    if lib == "torch":
        import torch

        torch.cuda.synchronize()
    else:
        import cupy

        cupy.cuda.runtime.deviceSynchronize()


def writer(master: str, pages: int, layers: int, reps: int, lib: str, transport: str) -> dict[str, Any]:
    from kvstore.client import KVStoreClient
    from kvstore.config import load

    client = KVStoreClient(
        master, namespace=NAMESPACE, config=load({"transport": transport, "copy_threads": 8}, environ={})
    )
    seg = client.layout.segment_bytes
    kv = [_gpu_tensor(lib, pages, seg, True) for _ in range(layers)]
    _sync(lib)
    warm = prompt(999, 4 * PAGE)  # compiles the kernel, registers the pool
    for layer in range(layers):
        client.put_layer(warm, layer, kv[layer][:4])
    first_layer: list[float] = []  # includes OpenPut (16384 slots allocated)
    per_layer: list[float] = []  # layers between the first and the last: the data path alone
    last_layer: list[float] = []  # includes the final CommitLayer and waiting for the checksums
    sequence: list[float] = []
    for rep in range(reps):
        tokens = prompt(rep, pages * PAGE)
        start = time.perf_counter()
        for layer in range(layers):
            t0 = time.perf_counter()
            written = client.put_layer(tokens, layer, kv[layer])
            dt = time.perf_counter() - t0
            assert written == pages, f"wrote {written} of {pages} pages"
            (first_layer if layer == 0 else last_layer if layer == layers - 1 else per_layer).append(dt)
        sequence.append(time.perf_counter() - start)
    client.close()
    nbytes = pages * seg
    return {
        "put_first_layer_s": first_layer,
        "put_first_layer_GBps": nbytes / _median(first_layer) / 1e9,
        "put_layer_s": per_layer,
        "put_last_layer_s": last_layer,
        "put_sequence_s": sequence,
        "put_layer_GBps": nbytes / _median(per_layer) / 1e9,
        "put_last_layer_GBps": nbytes / _median(last_layer) / 1e9,
        "put_sequence_GBps": layers * nbytes / _median(sequence) / 1e9,
    }


def _event_time(fn: Any, stream: Any) -> float:
    import cupy

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1000.0


def baselines(pool_path: str, incarnation: bytes, pages: int, seg: int, reps: int) -> dict[str, Any]:
    """Single 1 GiB copies, 16384 separate copies and the bare kernel (medians, GB/s)."""
    import cupy

    from kvstore.gpu import hostreg
    from kvstore.gpu.engine import engine_for
    from kvstore.tiers.dram import DramPool

    nbytes = pages * seg
    dev = cupy.empty(nbytes, dtype=cupy.uint8)
    dev[...] = 7
    pinned_mem = cupy.cuda.alloc_pinned_memory(nbytes)
    pinned = int(pinned_mem.ptr)
    pool = DramPool.attach(pool_path, incarnation)
    pool_dev = hostreg.device_pointer(pool.base_address, len(pool.bytes), 0) + pool.header.data_offset
    stream = cupy.cuda.Stream(non_blocking=True)
    rt = cupy.cuda.runtime
    out: dict[str, Any] = {}

    def copy(dst: int, src: int) -> Any:
        return lambda: rt.memcpyAsync(dst, src, nbytes, rt.memcpyDefault, stream.ptr)

    cases = {
        "memcpy_1GiB_pinned_D2H": copy(pinned, dev.data.ptr),
        "memcpy_1GiB_pinned_H2D": copy(dev.data.ptr, pinned),
        "memcpy_1GiB_pool_D2H": copy(pool_dev, dev.data.ptr),
        "memcpy_1GiB_pool_H2D": copy(dev.data.ptr, pool_dev),
    }
    offs = np.arange(pages, dtype=np.uint64) * np.uint64(seg)
    # scattered slots: every 4th segment-sized slot of the pool area, in a shuffled order
    slots = np.random.default_rng(0).permutation(pages).astype(np.uint64) * np.uint64(4 * seg)
    assert int(slots.max()) + seg <= pool.header.data_bytes

    def many(to_host: bool) -> Any:
        def run() -> None:
            for i in range(pages):
                d, s = (pool_dev + int(slots[i]), dev.data.ptr + int(offs[i]))
                if not to_host:
                    d, s = s, d
                rt.memcpyAsync(d, s, seg, rt.memcpyDefault, stream.ptr)

        return run

    for name, fn in cases.items():
        fn()
        stream.synchronize()
        times = [_event_time(fn, stream) for _ in range(reps)]
        out[name] = {"s": _median(times), "GBps": nbytes / _median(times) / 1e9}
    cases = {}
    cases["memcpy_16384x64KiB_D2H"] = many(True)
    cases["memcpy_16384x64KiB_H2D"] = many(False)
    engine = engine_for(0)
    scatter = np.stack(
        [np.uint64(pool_dev) + slots, np.uint64(dev.data.ptr) + offs, np.full(pages, seg, np.uint64)], axis=1
    )
    gather = scatter[:, [1, 0, 2]].copy()

    def kernel(table: np.ndarray) -> Any:
        def run() -> None:
            engine.copy_segments(table)

        return run

    for name, fn in cases.items():
        fn()
        stream.synchronize()
        times = [_event_time(fn, stream) for _ in range(reps)]
        out[name] = {"s": _median(times), "GBps": nbytes / _median(times) / 1e9}
    seq_slots = np.arange(pages, dtype=np.uint64) * np.uint64(seg)
    seq_scatter = np.stack(
        [np.uint64(pool_dev) + seq_slots, np.uint64(dev.data.ptr) + offs, np.full(pages, seg, np.uint64)],
        axis=1,
    )
    seq_gather = seq_scatter[:, [1, 0, 2]].copy()
    tables = {
        "kernel_scatter_16384x64KiB": scatter,
        "kernel_gather_16384x64KiB": gather,
        "kernel_scatter_16384x64KiB_contiguous_slots": seq_scatter,
        "kernel_gather_16384x64KiB_contiguous_slots": seq_gather,
    }
    for name, table in tables.items():
        fn = kernel(table)
        fn()
        engine.sync()
        times = [_event_time(fn, engine.stream) for _ in range(reps)]
        out[name] = {"s": _median(times), "GBps": nbytes / _median(times) / 1e9}
    sweep: dict[str, float] = {}
    for threads in (128, 256, 512, 1024):
        for per_sm in (1, 2, 4, 8, 16, 32):
            if threads * per_sm > 4096:
                continue
            engine.configure(threads, per_sm)
            for name, table in (("scatter", scatter), ("gather", gather)):
                fn = kernel(table)
                fn()
                engine.sync()
                times = [_event_time(fn, engine.stream) for _ in range(3)]
                sweep[f"{name} threads={threads} blocks/SM={per_sm}"] = nbytes / _median(times) / 1e9
    from kvstore.gpu import engine as engine_module

    engine.configure(engine_module.THREADS, engine_module.BLOCKS_PER_SM)
    out["kernel_launch_sweep_GBps"] = sweep
    hostreg.unregister(pool.base_address)
    pool.close(unlink=False)
    return out


def reader(master: str, pages: int, layers: int, reps: int, lib: str, transport: str) -> dict[str, Any]:
    from kvstore.client import KVStoreClient
    from kvstore.config import load

    client = KVStoreClient(
        master, namespace=NAMESPACE, config=load({"transport": transport, "copy_threads": 8}, environ={})
    )
    seg = client.layout.segment_bytes
    out = _gpu_tensor(lib, pages, seg, False)
    warm = prompt(999, 4 * PAGE)
    client.get_prefix(warm, layers=[0], out=out[:4])
    per_layer: list[float] = []
    leased: list[float] = []
    for rep in range(reps):
        tokens = prompt(rep, pages * PAGE)
        for layer in range(layers):
            t0 = time.perf_counter()
            hit = client.get_prefix(tokens, layers=[layer], out=out)
            per_layer.append(time.perf_counter() - t0)
            assert hit.num_pages == pages, f"read {hit.num_pages} of {pages} pages"
        lease = client.acquire_prefix(tokens)  # the scheduler's match-and-lease, then per-layer reads
        for layer in range(layers):
            t0 = time.perf_counter()
            hit = client.get_prefix(tokens, layers=[layer], out=out, lease=lease)
            leased.append(time.perf_counter() - t0)
            assert hit.num_pages == pages, f"read {hit.num_pages} of {pages} pages"
        client.release(lease)
    client.close()
    nbytes = pages * seg
    return {
        "get_layer_s": per_layer,
        "get_layer_GBps": nbytes / _median(per_layer) / 1e9,
        "get_layer_leased_s": leased,
        "get_layer_leased_GBps": nbytes / _median(leased) / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--lib", choices=("torch", "cupy"), default="torch")
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--dram", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args()
    seg = 2 * KV_HEADS * PAGE * HEAD_DIM * 2
    page_bytes = ((args.layers * seg + 4095) // 4096) * 4096
    free = (
        os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize if os.path.isdir("/dev/shm") else 0
    )
    fit = int(free * 0.9) // (args.pages * page_bytes) - 1  # one sequence per rep, plus the warm-up
    if not args.dram and 1 <= fit < args.reps:
        print(f"/dev/shm has {free >> 20} MiB free: {fit} reps instead of {args.reps}", file=sys.stderr)
        args.reps = fit
    dram = args.dram or str(args.pages * page_bytes * (args.reps + 1) + (256 << 20))
    result: dict[str, Any] = {
        "pages": args.pages,
        "segment_bytes": seg,
        "layer_batch_bytes": args.pages * seg,
        "layers": args.layers,
        "reps": args.reps,
        "lib": args.lib,
        "transport": args.transport,
    }
    try:
        import cupy

        result["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as exc:  # noqa: BLE001
        result["gpu"] = f"unknown ({exc})"
    with Cluster(1, dram=dram, read_lease_ms=60000, write_lease_ms=120000) as cluster:
        setup = cluster.client(NAMESPACE)
        setup.create_namespace(
            page_size=PAGE,
            num_layers=args.layers,
            kind="mha",
            kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            dtype="bfloat16",
        )
        setup.close()
        with process_pool(1) as wpool, process_pool(1) as rpool:
            result["writer"] = wpool.submit(
                writer, cluster.master_address, args.pages, args.layers, args.reps, args.lib, args.transport
            ).result()
            result["reader"] = rpool.submit(
                reader, cluster.master_address, args.pages, args.layers, args.reps, args.lib, args.transport
            ).result()
            if not args.skip_baselines:
                pool_file = os.path.join(cluster.shm_dir, cluster.pool_files()[0])
                from kvstore.tiers.dram import read_header

                with open(pool_file, "rb") as f:
                    incarnation = read_header(f.read(4096)).incarnation
                result["baselines"] = rpool.submit(
                    baselines, pool_file, incarnation, args.pages, seg, max(args.reps, 5)
                ).result()
    if "baselines" in result:
        b = result["baselines"]
        result["put_vs_single_copy"] = (
            result["writer"]["put_layer_GBps"] / b["memcpy_1GiB_pinned_D2H"]["GBps"]
        )
        result["get_vs_single_copy"] = (
            result["reader"]["get_layer_GBps"] / b["memcpy_1GiB_pinned_H2D"]["GBps"]
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
