"""GPU data plane benchmark (issue 5): put_layer / get_prefix GB/s with GPU tensors vs single copies.

Runs a one-node cluster (kvstore.testing.Cluster), a writer and a reader in
separate spawned processes, and in the reader's process the baselines: one
1 GiB cudaMemcpy between the GPU and pinned memory (cudaHostAlloc), the same
into the node's registered pool mapping, 16384 separate 64 KiB cudaMemcpyAsync
calls, the bare gather/scatter kernel over the same 16384 segments, and one
strided copy (cudaMemcpy2DAsync) over them.  The SDK calls alternate between
the copy-engine path (strided copies per run of consecutive slots) and the
forced kernel path, sequence by sequence; each call's GPU copy time is recorded
beside its wall time.  Medians of ``--reps`` runs; JSON on stdout (and in ``--json``).

``--stream``: a prefill process writes ``--stream-layers`` layers (GPU tensors,
put_layer_async) while a decoder process streams them into a GPU tensor
(get_prefix_stream); reports how long after the last layer's commit the
decoder has every layer, beside one layer's transfer time; the writer's CommitLayer calls
and the decoder's stream updates and reads are traced (``runs[i].writer.commits``,
``runs[i].decoder.trace``).

``--hash-only``: the GPU XXH3 kernel (the checksums of GPU writes) over 1 GiB of device
memory in 4 KiB, 64 KiB and 1 MiB ranges.

``--interference-only``: one 16384 x 64 KiB strided D2H copy alone, with the XXH3 kernel
beside it (second stream) and after it, into cudaHostAlloc memory and into a registered
mmap like a node's pool.

``--vram-only``: a node with a VRAM region; put_layer / leased get_prefix GB/s through
CUDA IPC (GPU tensor <-> the region) beside one 1 GiB device-to-device copy, then the
VRAM -> DRAM demotion throughput (one sequence past the high watermark, time until the
region is under its low one; ``--vram-move-batch`` sets tier_move_batch).

    source bench/gpu/prepare.sh && python bench/gpu/bench_gpu.py --stream --json $OUT/bench_gpu.json
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

ASYNC_REPS = 2  # sequences of pipelined put_layer_async per writer run
PATHS = ("copy_engine", "kernel")  # the SDK's strided-copy path, and the one-launch kernel forced


def _set_path(path: str) -> None:
    """Select the SDK's GPU path for this process (the kernel: no strided copies allowed)."""
    from kvstore.gpu import transfer

    transfer.MAX_RECT_COPIES = 0 if path == "kernel" else 64
    transfer.RECT_WRITES = path == "copy_engine"  # "sdk": the SDK's own choice (kernel writes, strided reads)


def _timing(on: bool) -> Any:
    from kvstore.gpu.engine import engine_for

    engine = engine_for(0)
    engine.timing = on
    return engine


def _time_transfers() -> list[float]:
    """Wrap the same-host GPU transfers of this process: each one's wall time (lock, copies, sync) lands in
    the returned list, to tell the SDK call's own overhead from the transfer's."""
    from kvstore.gpu import transfer

    spent: list[float] = []

    def timed(fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t0)

        return run

    transfer.shm_write = timed(transfer.shm_write)  # type: ignore[method-assign]
    transfer.shm_read = timed(transfer.shm_read)  # type: ignore[method-assign]
    return spent


def _now() -> float:
    """CLOCK_MONOTONIC: one clock for every process of the host."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


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


def _bench_client(master: str, transport: str, switch_ms: float) -> Any:
    """The writer's or reader's client (8 copy threads), with the process's GIL switch interval set."""
    from kvstore.client import KVStoreClient
    from kvstore.config import load

    _switch_interval(switch_ms)
    return KVStoreClient(
        master, namespace=NAMESPACE, config=load({"transport": transport, "copy_threads": 8}, environ={})
    )


def writer(
    master: str,
    pages: int,
    layers: int,
    reps: int,
    lib: str,
    transport: str,
    switch_ms: float = 0.0,
    token_sequence: bool = False,
) -> dict[str, Any]:
    """Per-layer puts, synchronous and pipelined; ``token_sequence``: each request's tokens passed
    as one kvstore.TokenSequence (converted and hashed once), as an engine would."""
    from kvstore.keys import TokenSequence

    def request_tokens(seed: int) -> Any:
        tokens = prompt(seed, pages * PAGE)
        return TokenSequence(tokens) if token_sequence else tokens

    client = _bench_client(master, transport, switch_ms)
    seg = client.layout.segment_bytes
    kv = [_gpu_tensor(lib, pages, seg, True) for _ in range(layers)]
    _sync(lib)
    warm = prompt(999, 4 * PAGE)  # compiles the kernel, registers the pool
    for layer in range(layers):
        client.put_layer(warm, layer, kv[layer][:4])
    engine = _timing(True)
    spent = _time_transfers()
    first_layer: list[float] = []  # includes OpenPut (16384 slots allocated)
    last_layer: list[float] = []  # includes the final CommitLayer and waiting for the checksums
    sequence: list[float] = []
    # layers between the first and the last (the data path alone), per path: wall and GPU copy time
    per_layer: dict[str, list[float]] = {p: [] for p in PATHS}
    copy_gpu: dict[str, list[float]] = {p: [] for p in PATHS}
    transfer_wall: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(reps):
        path = PATHS[rep % 2] if reps > 1 else PATHS[0]
        _set_path(path)
        tokens = request_tokens(rep)
        start = time.perf_counter()
        for layer in range(layers):
            t0 = time.perf_counter()
            written = client.put_layer(tokens, layer, kv[layer])
            dt = time.perf_counter() - t0
            assert written == pages, f"wrote {written} of {pages} pages"
            if layer == 0:
                first_layer.append(dt)
            elif layer == layers - 1:
                last_layer.append(dt)
            else:
                per_layer[path].append(dt)
                copy_gpu[path].append(engine.last_copy_s)
                transfer_wall[path].append(spent[-1])
        sequence.append(time.perf_counter() - start)
    _set_path("sdk")
    # put_layer_async, pipelined: layer 0 (with the OpenPut) first, then the other layers handed
    # over back to back; their GB/s from layer 0's completion to the flush (the durable commit)
    async_after_first: list[float] = []
    for rep in range(ASYNC_REPS):
        tokens = request_tokens(10_000 + rep)
        client.put_layer_async(tokens, 0, kv[0]).result(120)
        t0 = time.perf_counter()
        for layer in range(1, layers):
            client.put_layer_async(tokens, layer, kv[layer])
        client.flush(120)
        async_after_first.append(time.perf_counter() - t0)
    client.close()
    nbytes = pages * seg
    result: dict[str, Any] = {
        "token_sequence": token_sequence,
        "put_first_layer_s": first_layer,
        "put_first_layer_GBps": nbytes / _median(first_layer) / 1e9,
        "put_last_layer_s": last_layer,
        "put_sequence_s": sequence,
        "put_last_layer_GBps": nbytes / _median(last_layer) / 1e9,
        "put_sequence_GBps": layers * nbytes / _median(sequence) / 1e9,
        "put_async_after_first_layer_s": async_after_first,
        "put_async_after_first_layer_GBps": (layers - 1) * nbytes / _median(async_after_first) / 1e9
        if async_after_first and layers > 1
        else 0.0,
    }
    for path in PATHS:
        if per_layer[path]:
            result[f"put_layer_{path}_s"] = per_layer[path]
            result[f"put_layer_{path}_GBps"] = nbytes / _median(per_layer[path]) / 1e9
            result[f"put_layer_{path}_gpu_copy_s"] = copy_gpu[path]
            result[f"put_layer_{path}_gpu_copy_GBps"] = nbytes / _median(copy_gpu[path]) / 1e9
            result[f"put_layer_{path}_transfer_wall_s"] = transfer_wall[path]  # shm_write: lock+copies+sync
    # the SDK's own choice for writes: the kernel (kvstore.gpu.transfer.RECT_WRITES)
    result["put_layer_s"] = per_layer["kernel"] or per_layer["copy_engine"]
    result["put_layer_GBps"] = result.get("put_layer_kernel_GBps", result["put_layer_copy_engine_GBps"])
    return result


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
    # The copy engines on a strided region: 16384 rows of 64 KiB, 4 segments apart in the pool
    # (what the SDK's copy-engine path issues for a run of consecutive slots).
    pitch = 4 * seg

    def strided(to_host: bool) -> Any:
        if to_host:
            return lambda: rt.memcpy2DAsync(
                pool_dev, pitch, dev.data.ptr, seg, seg, pages, rt.memcpyDefault, stream.ptr
            )
        return lambda: rt.memcpy2DAsync(
            dev.data.ptr, seg, pool_dev, pitch, seg, pages, rt.memcpyDefault, stream.ptr
        )

    cases = {
        "memcpy2D_16384x64KiB_pool_D2H": strided(True),
        "memcpy2D_16384x64KiB_pool_H2D": strided(False),
    }
    for name, fn in cases.items():
        fn()
        stream.synchronize()
        times = [_event_time(fn, stream) for _ in range(reps)]
        out[name] = {"s": _median(times), "GBps": nbytes / _median(times) / 1e9}
    # A GPU put's checksum: the client hashes the landed bytes on the host (copy_threads threads)
    # while the next layer copies. How long one layer's hash takes, and what it costs a copy.
    from kvstore import native

    ranges = np.array([[pool.data_address + i * seg, seg] for i in range(pages)], dtype=np.uint64)
    hash_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        native.hash_ranges(ranges, 8)
        hash_times.append(time.perf_counter() - t0)
    out["hash_1GiB_8threads"] = {"s": _median(hash_times), "GBps": nbytes / _median(hash_times) / 1e9}
    import threading

    stop = threading.Event()

    def hash_loop() -> None:
        while not stop.is_set():
            native.hash_ranges(ranges, 8)

    hasher = threading.Thread(target=hash_loop, daemon=True)
    hasher.start()
    try:
        for name, fn in (
            ("memcpy2D_16384x64KiB_pool_D2H_while_hashing", strided(True)),
            ("memcpy2D_16384x64KiB_pool_H2D_while_hashing", strided(False)),
        ):
            times = [_event_time(fn, stream) for _ in range(reps)]
            out[name] = {"s": _median(times), "GBps": nbytes / _median(times) / 1e9}
    finally:
        stop.set()
        hasher.join()
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


def reader(
    master: str, pages: int, layers: int, reps: int, lib: str, transport: str, switch_ms: float = 0.0
) -> dict[str, Any]:
    client = _bench_client(master, transport, switch_ms)
    seg = client.layout.segment_bytes
    out = _gpu_tensor(lib, pages, seg, False)
    warm = prompt(999, 4 * PAGE)
    client.get_prefix(warm, layers=[0], out=out[:4])
    engine = _timing(True)
    spent = _time_transfers()
    result: dict[str, Any] = {}
    nbytes = pages * seg
    for path in PATHS:
        _set_path(path)
        per_layer: list[float] = []
        leased: list[float] = []
        copy_gpu: list[float] = []
        transfer_wall: list[float] = []
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
                copy_gpu.append(engine.last_copy_s)
                transfer_wall.append(spent[-1])
                assert hit.num_pages == pages, f"read {hit.num_pages} of {pages} pages"
            client.release(lease)
        result[f"get_layer_{path}_s"] = per_layer
        result[f"get_layer_{path}_GBps"] = nbytes / _median(per_layer) / 1e9
        result[f"get_layer_leased_{path}_s"] = leased
        result[f"get_layer_leased_{path}_GBps"] = nbytes / _median(leased) / 1e9
        result[f"get_layer_leased_{path}_gpu_copy_s"] = copy_gpu
        result[f"get_layer_leased_{path}_gpu_copy_GBps"] = nbytes / _median(copy_gpu) / 1e9
        result[f"get_layer_leased_{path}_transfer_wall_s"] = transfer_wall  # shm_read: lock+copies+sync
    _set_path("copy_engine")
    client.close()
    for key in ("get_layer", "get_layer_leased"):
        result[f"{key}_s"] = result[f"{key}_copy_engine_s"]
        result[f"{key}_GBps"] = result[f"{key}_copy_engine_GBps"]
    return result


# ----------------------------------------------------------------------------- streaming (issue 5)

STREAM_NAMESPACE = "bench/gpu-stream"
_worker: dict[str, Any] = {}  # the client and tensors of a stream worker process, kept between calls


def _switch_interval(ms: float) -> None:
    if ms:
        sys.setswitchinterval(ms / 1000.0)


def stream_writer_setup(
    master: str, pages: int, layers: int, lib: str, switch_ms: float = 0.0, write_path: str = "sdk"
) -> float:
    """The prefill process: a client, one GPU tensor per layer, the kernel and pool warmed up."""
    _switch_interval(switch_ms)
    _set_path(write_path)
    from kvstore.client import KVStoreClient
    from kvstore.config import load

    client = KVStoreClient(master, namespace=STREAM_NAMESPACE, config=load({"copy_threads": 8}, environ={}))
    seg = client.layout.segment_bytes
    kv = [_gpu_tensor(lib, pages, seg, True) for _ in range(layers)]
    _sync(lib)
    warm = prompt(998, 4 * PAGE)
    for layer in range(layers):
        client.put_layer(warm, layer, kv[layer][:4])
    _worker.update(client=client, kv=kv, pages=pages, layers=layers, lib=lib, commits=_trace_commits(client))
    # one layer's put, the data path alone: the middle layers of a sequence written synchronously
    tokens = prompt(997, pages * PAGE)
    times = []
    for layer in range(layers):
        t0 = time.perf_counter()
        client.put_layer(tokens, layer, kv[layer])
        times.append(time.perf_counter() - t0)
    return _median(times[1:-1])


def _gpu_compute(layer_ms: float) -> Any:
    """A callable that queues ~``layer_ms`` of bf16 matmuls on torch's current stream (no host wait):
    a layer's compute, which the SDK's copy of that layer waits for through DLPack's stream handshake."""
    import torch

    a = torch.randn((4096, 4096), dtype=torch.bfloat16, device="cuda")
    b = torch.randn((4096, 4096), dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(a)
    for _ in range(20):
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize()
    count = max(1, round(layer_ms / ((time.perf_counter() - t0) / 200 * 1e3)))

    def compute() -> None:
        for _ in range(count):
            torch.matmul(a, b, out=out)

    return compute


def stream_writer_rep(rep: int, layer_ms: float, compute: str = "sleep") -> dict[str, Any]:
    """Write every layer with put_layer_async, ``layer_ms`` of pretend compute before each: a host
    sleep, or (``compute="gpu"``) matmuls queued on the GPU ahead of the layer's put."""
    client, kv, pages, layers = _worker["client"], _worker["kv"], _worker["pages"], _worker["layers"]
    tokens = prompt(10_000 + rep, pages * PAGE)
    done = [0.0] * layers
    run_layer = None
    if layer_ms and compute == "gpu":
        run_layer = _worker.get("gpu_compute") or _worker.setdefault("gpu_compute", _gpu_compute(layer_ms))
        _sync("torch")
    start = _now()
    futures = []
    for layer in range(layers):
        if run_layer is not None:
            run_layer()
        elif layer_ms:
            time.sleep(layer_ms / 1000.0)
        future = client.put_layer_async(tokens, layer, kv[layer])

        def stamp(_f: Any, layer: int = layer) -> None:
            done[layer] = _now()

        future.add_done_callback(stamp)
        futures.append(future)
    handed = _now()
    client.flush()
    assert all(f.result() == pages for f in futures)
    commits = [c for c in _worker["commits"] if c[0] >= start]
    _worker["commits"].clear()
    return {"start": start, "handed_over": handed, "done": done, "commits": commits}


def _trace_commits(client: Any) -> list[tuple[float, float, int, bool]]:
    """Record every CommitLayer of the writer: (sent, answered, layers, deferred) - where a stream's wait goes."""
    trace: list[tuple[float, float, int, bool]] = []
    acall = client._master.acall

    async def traced(method: str, request: Any, *args: Any, **kwargs: Any) -> Any:
        if method != "CommitLayer":
            return await acall(method, request, *args, **kwargs)
        sent = _now()
        try:
            return await acall(method, request, *args, **kwargs)
        finally:
            trace.append((sent, _now(), len(request.layers) // 2, bool(request.deferred)))

    client._master.acall = traced
    return trace


def _trace_stream() -> list[tuple[str, float, int]]:
    """Record in the decoder when each stream update is taken in and each read starts/ends."""
    from kvstore.client import stream as stream_mod

    trace: list[tuple[str, float, int]] = []
    absorb, read_layers = stream_mod.PrefixStream._absorb, stream_mod.PrefixStream._read_layers

    def traced_absorb(self: Any, update: Any) -> None:
        trace.append(("update", _now(), len(update.layers_ready) // 2))
        absorb(self, update)

    def traced_read(self: Any, first: int, stop: int) -> None:
        trace.append(("read", _now(), stop - first))
        read_layers(self, first, stop)
        trace.append(("read_done", _now(), stop - first))

    stream_mod.PrefixStream._absorb = traced_absorb  # type: ignore[method-assign]
    stream_mod.PrefixStream._read_layers = traced_read  # type: ignore[method-assign]
    return trace


def stream_decoder_setup(
    master: str, pages: int, layers: int, lib: str, switch_ms: float = 0.0, read_path: str = "sdk"
) -> None:
    _switch_interval(switch_ms)
    _set_path(read_path)
    from kvstore.client import KVStoreClient
    from kvstore.config import load

    client = KVStoreClient(master, namespace=STREAM_NAMESPACE, config=load({"copy_threads": 8}, environ={}))
    seg = client.layout.segment_bytes
    out = _gpu_tensor(lib, layers * pages, seg, False).reshape(layers, pages, -1)
    warm = _gpu_tensor(lib, layers * 4, seg, False).reshape(layers, 4, -1)
    client.get_prefix(prompt(998, 4 * PAGE), out=warm)  # compiles the kernel, registers the pool
    _worker.update(client=client, out=out, pages=pages, layers=layers, trace=_trace_stream())


def stream_decoder_rep(rep: int) -> dict[str, Any]:
    """Stream the rep's prefix into a GPU tensor as it is written; then time one layer's leased read."""
    client, out, pages, layers = _worker["client"], _worker["out"], _worker["pages"], _worker["layers"]
    tokens = prompt(10_000 + rep, pages * PAGE)
    opened = _now()
    ready_at = [0.0] * layers
    with client.get_prefix_stream(tokens, out=out, wait_ms=60_000) as stream:
        first = _now()
        for ready in stream:
            ready_at[ready.index] = _now()
            assert ready.num_pages == pages, f"layer {ready.layer}: {ready.num_pages} of {pages} pages"
    trace = [t for t in _worker["trace"] if t[1] >= opened]
    _worker["trace"].clear()
    lease = client.acquire_prefix(tokens)
    one = []
    for layer in range(min(layers, 8)):
        t0 = time.perf_counter()
        client.get_prefix(tokens, layers=[layer], out=out[layer], lease=lease)
        one.append(time.perf_counter() - t0)
    client.release(lease)
    return {
        "opened": opened,
        "first_answer": first,
        "ready_at": ready_at,
        "get_one_layer_s": _median(one),
        "trace": trace,
    }


def stream_close() -> None:
    client = _worker.pop("client", None)
    if client is not None:
        client.close()
    _worker.clear()


def stream_bench(
    pages: int,
    layers: int,
    reps: int,
    lib: str,
    layer_ms: float,
    switch_ms: float = 0.0,
    read_path: str = "sdk",
    write_path: str = "sdk",
    compute: str = "sleep",
) -> dict[str, Any]:
    """Prefill and decoder in two processes; the decoder has every layer how long after the last commit?"""
    seg = 2 * KV_HEADS * PAGE * HEAD_DIM * 2
    slot = ((layers * seg + 4095) // 4096) * 4096
    dram = str(pages * slot * (reps + 2) + (256 << 20))  # the reps, the synchronous sequence, the warm-up
    with Cluster(1, dram=dram, read_lease_ms=60000, write_lease_ms=120000, startup_timeout=120.0) as cluster:
        setup = cluster.client(STREAM_NAMESPACE)
        setup.create_namespace(
            page_size=PAGE,
            num_layers=layers,
            kind="mha",
            kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            dtype="bfloat16",
        )
        setup.close()
        with process_pool(1) as wpool, process_pool(1) as dpool:
            put_layer_s = wpool.submit(
                stream_writer_setup, cluster.master_address, pages, layers, lib, switch_ms, write_path
            ).result()
            dpool.submit(
                stream_decoder_setup, cluster.master_address, pages, layers, lib, switch_ms, read_path
            ).result()
            runs = []
            for rep in range(reps):
                decoded = dpool.submit(stream_decoder_rep, rep)
                time.sleep(0.2)  # the decoder asks first, as a decode worker would (it waits for page 0)
                written = wpool.submit(stream_writer_rep, rep, layer_ms, compute).result()
                runs.append({"writer": written, "decoder": decoded.result()})
            wpool.submit(stream_close).result()
            dpool.submit(stream_close).result()
    after_commit = [r["decoder"]["ready_at"][-1] - r["writer"]["done"][-1] for r in runs]
    all_ready = [max(r["decoder"]["ready_at"]) for r in runs]
    nbytes = pages * seg
    get_one = _median([r["decoder"]["get_one_layer_s"] for r in runs])
    return {
        "pages": pages,
        "layers": layers,
        "layer_bytes": nbytes,
        "reps": reps,
        "layer_compute_ms": layer_ms,
        "layer_compute": compute,
        "read_path": read_path,
        "write_path": write_path,
        # decoder has every layer, minus the writer's last put_layer_async done (its CommitLayer answered)
        "all_layers_after_last_commit_s": [
            a - r["writer"]["done"][-1] for a, r in zip(all_ready, runs, strict=True)
        ],
        "all_layers_after_last_commit_median_s": _median(
            [a - r["writer"]["done"][-1] for a, r in zip(all_ready, runs, strict=True)]
        ),
        "last_layer_after_its_commit_s": after_commit,
        "write_all_layers_s": [r["writer"]["done"][-1] - r["writer"]["start"] for r in runs],
        "decoder_all_layers_from_write_start_s": [
            a - r["writer"]["start"] for a, r in zip(all_ready, runs, strict=True)
        ],
        "one_layer_put_s": put_layer_s,
        "one_layer_get_leased_s": get_one,
        "one_layer_put_GBps": nbytes / put_layer_s / 1e9,
        "one_layer_get_GBps": nbytes / get_one / 1e9,
        "runs": runs,
    }


# ----------------------------------------------------------------------------- VRAM tier (CUDA IPC)

VRAM_NAMESPACE = "bench/gpu-vram"


def _ipc_nodes(client: Any) -> list[str]:
    return sorted(n for n, (_, ipc) in client._transports._ipc.items() if ipc is not None and ipc._pointers)


def vram_worker(master: str, pages: int, layers: int, reps: int, lib: str) -> dict[str, Any]:
    """Puts from a GPU tensor into the node's VRAM region and leased reads back, both over CUDA IPC."""
    import torch

    from kvstore.client import KVStoreClient
    from kvstore.config import load

    client = KVStoreClient(master, namespace=VRAM_NAMESPACE, config=load({"copy_threads": 8}, environ={}))
    seg = client.layout.segment_bytes
    kv = _gpu_tensor(lib, pages, seg, True)
    out = _gpu_tensor(lib, pages, seg, False)
    warm = prompt(996, 4 * PAGE)
    for layer in range(layers):
        client.put_layer(warm, layer, kv[:4])
    client.get_prefix(warm, layers=[0], out=out[:4])
    put: list[float] = []
    get: list[float] = []
    sequence: list[float] = []
    for rep in range(reps):
        tokens = prompt(20_000 + rep, pages * PAGE)
        start = time.perf_counter()
        for layer in range(layers):
            t0 = time.perf_counter()
            client.put_layer(tokens, layer, kv)
            if 0 < layer < layers - 1:  # the data path: no OpenPut, no final (durable) commit
                put.append(time.perf_counter() - t0)
        sequence.append(time.perf_counter() - start)  # OpenPut to the final commit (every checksum)
        lease = client.acquire_prefix(tokens)
        assert lease.num_pages == pages, lease
        for layer in range(layers):
            t0 = time.perf_counter()
            hit = client.get_prefix(tokens, layers=[layer], out=out, lease=lease)
            get.append(time.perf_counter() - t0)
            assert hit.num_pages == pages
        client.release(lease)
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8)), "VRAM read-back differs"
    opened = _ipc_nodes(client)
    # the baseline: one 1 GiB device-to-device copy on the same GPU
    a = torch.empty(pages * seg, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    d2d = []
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        stop.record()
        stop.synchronize()
        d2d.append(start.elapsed_time(stop) / 1000.0)
    client.close()
    nbytes = pages * seg
    result = {
        "ipc_nodes": opened,
        "put_layer_s": put,
        "put_sequence_s": sequence,
        "put_sequence_GBps": layers * nbytes / _median(sequence) / 1e9,
        "get_layer_leased_s": get,
        "memcpy_1GiB_D2D_s": d2d,
        "put_layer_GBps": nbytes / _median(put) / 1e9,
        "get_layer_leased_GBps": nbytes / _median(get) / 1e9,
        "memcpy_1GiB_D2D_GBps": nbytes / _median(d2d) / 1e9,
    }
    result["put_vs_d2d"] = result["put_layer_GBps"] / result["memcpy_1GiB_D2D_GBps"]
    result["get_vs_d2d"] = result["get_layer_leased_GBps"] / result["memcpy_1GiB_D2D_GBps"]
    return result


def vram_fill(master: str, pages: int, layers: int, lib: str) -> float:
    """Write one sequence (GPU tensor, into VRAM); returns when its last commit was answered."""
    from kvstore.client import KVStoreClient
    from kvstore.config import load

    client = KVStoreClient(master, namespace=VRAM_NAMESPACE, config=load({"copy_threads": 8}, environ={}))
    kv = _gpu_tensor(lib, pages, client.layout.segment_bytes, True)
    tokens = prompt(30_000, pages * PAGE)
    for layer in range(layers):
        client.put_layer(tokens, layer, kv)
    done = _now()
    client.close()
    return done


def _vram_namespace(cluster: Any, layers: int) -> int:
    setup = cluster.client(VRAM_NAMESPACE)
    layout = setup.create_namespace(
        page_size=PAGE, num_layers=layers, kind="mha", kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="bfloat16"
    )
    setup.close()
    return int(layout.slot_bytes)


def _tiers(cluster: Any) -> dict[str, Any]:
    (node,) = cluster.stats().nodes
    return {t.tier: t for t in node.tiers}


def vram_bench(pages: int, layers: int, reps: int, lib: str, move_batch: int = 256) -> dict[str, Any]:
    """VRAM tier: put/get GB/s over CUDA IPC beside one D2D copy; then VRAM -> DRAM demotion throughput."""
    seg = 2 * KV_HEADS * PAGE * HEAD_DIM * 2
    slot = ((layers * seg + 4095) // 4096) * 4096
    gib = 1 << 30
    region = -(-(pages * slot * (reps + 1) + (256 << 20)) // gib) * gib
    result: dict[str, Any] = {"pages": pages, "layers": layers, "reps": reps, "vram_region_bytes": region}
    with Cluster(
        1,
        dram="256MiB",
        vram=f"{region >> 30}GiB:0",
        read_lease_ms=60000,
        write_lease_ms=120000,
        startup_timeout=120.0,
    ) as cluster:
        _vram_namespace(cluster, layers)
        with process_pool(1) as pool:
            result.update(pool.submit(vram_worker, cluster.master_address, pages, layers, reps, lib).result())
        result["vram_pages_after"] = int(_tiers(cluster)["vram"].pages)
    # Demotion: one sequence fills the region past its high watermark; time until it is under its low one.
    seq = pages * slot
    region = -(-int(seq / 0.8) // gib) * gib
    high, low = 0.5, 0.1
    with Cluster(
        1,
        dram=str(seq + gib),
        vram=f"{region >> 30}GiB:0",
        vram_high_watermark=high,
        vram_low_watermark=low,
        tier_move_batch=move_batch,
        read_lease_ms=60000,
        write_lease_ms=120000,
        startup_timeout=120.0,
    ) as cluster:
        slot_bytes = _vram_namespace(cluster, layers)
        with process_pool(1) as pool:
            done = pool.submit(vram_fill, cluster.master_address, pages, layers, lib).result()
        target = low * region + slot_bytes
        deadline = time.monotonic() + 120
        while _tiers(cluster)["vram"].allocated_bytes > target and time.monotonic() < deadline:
            time.sleep(0.005)
        under = _now()
        usage = _tiers(cluster)
        moved = int(usage["dram"].pages)
        result["demotion"] = {
            "vram_region_bytes": region,
            "high_watermark": high,
            "tier_move_batch": move_batch,
            "low_watermark": low,
            "pages_demoted": moved,
            "bytes_demoted": moved * slot_bytes,
            "seconds_after_last_commit": under - done,
            "GBps": moved * slot_bytes / (under - done) / 1e9 if under > done else float("nan"),
            "vram_pages_left": int(usage["vram"].pages),
        }
    return result


def hash_bench(reps: int = 5) -> dict[str, Any]:
    """The GPU XXH3 kernel over 1 GiB in device memory, for a few range sizes (GB/s, best of ``reps``)."""
    import cupy

    from kvstore.gpu.engine import engine_for

    engine = engine_for(0)
    data = cupy.random.randint(0, 255, 1 << 30, dtype=cupy.uint8)
    out: dict[str, Any] = {}
    for seg in (4 << 10, 64 << 10, 1 << 20):
        n = (1 << 30) // seg
        ranges = np.stack(
            [
                np.arange(n, dtype=np.uint64) * np.uint64(seg) + np.uint64(data.data.ptr),
                np.full(n, seg, dtype=np.uint64),
            ],
            axis=1,
        )
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            with engine:
                engine.hash_ranges(ranges)
                engine.sync()
            times.append(time.perf_counter() - t0)
        best = min(times[1:])
        out[f"{seg >> 10}KiB"] = {"ranges": n, "ms": best * 1e3, "GBps": (1 << 30) / best / 1e9}
    return out


def interference_bench(reps: int = 7) -> dict[str, Any]:
    """One 16384 x 64 KiB strided D2H copy, alone and with the XXH3 kernel beside it or after it.

    Into cudaHostAlloc memory, and into a registered anonymous mmap with the pool's 256 KiB
    pitch (a node's pool is a registered 4 KiB-page mapping): why GPU write hashes run in order.
    """
    import mmap

    import cupy
    import cupyx

    from kvstore.gpu import hostreg
    from kvstore.gpu.engine import engine_for

    engine = engine_for(0)
    n, seg, pitch = 16384, 64 << 10, 256 << 10
    src = cupy.random.randint(0, 255, n * seg, dtype=cupy.uint8)
    ranges = np.stack(
        [
            np.arange(n, dtype=np.uint64) * np.uint64(seg) + np.uint64(src.data.ptr),
            np.full(n, seg, dtype=np.uint64),
        ],
        axis=1,
    )
    pinned = cupyx.empty_pinned(n * seg, dtype=np.uint8)
    mapping = mmap.mmap(-1, n * pitch)
    host = np.frombuffer(mapping, dtype=np.uint8)
    host[::4096] = 1  # faulted in, as a node's pool is
    registered = hostreg.device_pointer(host.ctypes.data, n * pitch, 0)
    side = cupy.cuda.Stream(non_blocking=True)
    out = cupy.empty(n, dtype=cupy.uint64)
    ops = cupy.asarray(ranges)

    def once(dst: int, dst_pitch: int, mode: str) -> float:
        rect = np.array([[dst, dst_pitch, src.data.ptr, seg, seg, n]], dtype=np.uint64)
        with engine:
            t0 = time.perf_counter()
            fork = cupy.cuda.Event(disable_timing=True)
            fork.record(engine.stream)
            engine.copy_rects(rect)
            if mode == "beside":
                side.wait_event(fork)
                engine._xxh3((engine._sms * 8,), (256,), (ops, np.int64(n), out), stream=side)
            elif mode == "after":
                engine._xxh3((engine._sms * 8,), (256,), (ops, np.int64(n), out), stream=engine.stream)
            engine.stream.synchronize()
            side.synchronize()
            return time.perf_counter() - t0

    result: dict[str, Any] = {}
    for name, dst, dst_pitch in (
        ("cudaHostAlloc", pinned.ctypes.data, seg),
        ("registered_mmap", registered, pitch),
    ):
        for mode in ("alone", "beside", "after"):
            times = sorted(once(dst, dst_pitch, mode) for _ in range(reps))
            result[f"{name}_{mode}_ms"] = times[len(times) // 2] * 1e3
    return result


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
    parser.add_argument(
        "--switch-ms", type=float, default=0.0, help="sys.setswitchinterval in the writer and reader"
    )
    parser.add_argument("--stream", action="store_true", help="also run the layer streaming bench")
    parser.add_argument("--stream-only", action="store_true", help="run the layer streaming bench alone")
    parser.add_argument(
        "--stream-pages", type=int, default=512, help="pages per layer (512 x 64 KiB = 32 MiB)"
    )
    parser.add_argument("--stream-layers", type=int, default=32)
    parser.add_argument("--stream-reps", type=int, default=5)
    parser.add_argument("--stream-layer-ms", type=float, default=0.0, help="pretend compute per layer")
    parser.add_argument(
        "--stream-compute",
        choices=("sleep", "gpu"),
        default="sleep",
        help="what --stream-layer-ms is: a host sleep, or bf16 matmuls queued on the prefill's GPU (torch)",
    )
    parser.add_argument(
        "--stream-switch-ms", type=float, default=0.0, help="sys.setswitchinterval in both stream processes"
    )
    parser.add_argument(
        "--stream-read-path",
        choices=("sdk", "kernel", "copy_engine"),
        default="sdk",
        help="the decoder's read path (sdk: strided copies where the slots allow, else the kernel)",
    )
    parser.add_argument(
        "--stream-write-path",
        choices=("sdk", "kernel", "copy_engine"),
        default="sdk",
        help="the prefill's write path (sdk: one copy-and-hash kernel; copy_engine: strided copies, then a hash kernel)",
    )
    parser.add_argument(
        "--token-sequence",
        action="store_true",
        help="the writer passes each request's tokens as one kvstore.TokenSequence (hashed once)",
    )
    parser.add_argument("--vram-only", action="store_true", help="run the VRAM tier bench alone")
    parser.add_argument("--hash-only", action="store_true", help="run the GPU XXH3 kernel bench alone")
    parser.add_argument(
        "--interference-only",
        action="store_true",
        help="a strided D2H copy alone / with the XXH3 kernel beside / after (why write hashes run in order)",
    )
    parser.add_argument("--vram-reps", type=int, default=3)
    parser.add_argument(
        "--vram-move-batch", type=int, default=256, help="tier_move_batch of the demotion run"
    )
    args = parser.parse_args()
    if args.hash_only:
        _emit({"gpu": _gpu_name(), "xxh3_kernel": hash_bench()}, args.json)
        return
    if args.interference_only:
        _emit({"gpu": _gpu_name(), "copy_beside_kernel": interference_bench()}, args.json)
        return
    if args.vram_only:
        _emit(
            {
                "gpu": _gpu_name(),
                "vram": vram_bench(args.pages, args.layers, args.vram_reps, args.lib, args.vram_move_batch),
            },
            args.json,
        )
        return
    if args.stream_only:
        result = {
            "gpu": _gpu_name(),
            "stream": stream_bench(
                args.stream_pages,
                args.stream_layers,
                args.stream_reps,
                args.lib,
                args.stream_layer_ms,
                args.stream_switch_ms,
                args.stream_read_path,
                args.stream_write_path,
                args.stream_compute,
            ),
        }
        _emit(result, args.json)
        return
    seg = 2 * KV_HEADS * PAGE * HEAD_DIM * 2
    page_bytes = ((args.layers * seg + 4095) // 4096) * 4096
    free = (
        os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize if os.path.isdir("/dev/shm") else 0
    )
    # one sequence per rep, plus the warm-up and the async sequences
    fit = int(free * 0.9) // (args.pages * page_bytes) - 1 - ASYNC_REPS
    if not args.dram and 1 <= fit < args.reps:
        print(f"/dev/shm has {free >> 20} MiB free: {fit} reps instead of {args.reps}", file=sys.stderr)
        args.reps = fit
    dram = args.dram or str(args.pages * page_bytes * (args.reps + 1 + ASYNC_REPS) + (256 << 20))
    result: dict[str, Any] = {
        "pages": args.pages,
        "segment_bytes": seg,
        "layer_batch_bytes": args.pages * seg,
        "layers": args.layers,
        "reps": args.reps,
        "lib": args.lib,
        "transport": args.transport,
    }
    result["gpu"] = _gpu_name()
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
            common = (
                cluster.master_address,
                args.pages,
                args.layers,
                args.reps,
                args.lib,
                args.transport,
                args.switch_ms,
            )
            result["writer"] = wpool.submit(writer, *common, args.token_sequence).result()
            result["reader"] = rpool.submit(reader, *common).result()
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
    if args.stream:
        result["stream"] = stream_bench(
            args.stream_pages,
            args.stream_layers,
            args.stream_reps,
            args.lib,
            args.stream_layer_ms,
            args.stream_switch_ms,
            args.stream_read_path,
            args.stream_write_path,
            args.stream_compute,
        )
    _emit(result, args.json)


def _gpu_name() -> str:
    try:
        import cupy

        return str(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"


def _emit(result: dict[str, Any], path: str) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
