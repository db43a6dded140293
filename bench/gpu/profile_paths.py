"""Where the time of a GPU put_layer goes: host phases of a synchronous call, and the timeline of a
pipelined put_layer_async sequence (GPU copy start/end beside the host's steps).

source bench/gpu/prepare.sh && python bench/gpu/profile_paths.py [--json OUT]

Phases are inclusive wall times of the named functions, measured by wrapping them
(perf_counter, ~1 us each); a phase nested in another is counted in both.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import io
import json
import os
import pstats
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kvstore.testing import Cluster, prompt  # noqa: E402

PAGES = 16384

_spent: dict[str, list[float]] = collections.defaultdict(list)
_faults: dict[str, list[int]] = collections.defaultdict(list)  # minor page faults (the process's) inside
_events: list[tuple[float, str]] = []
_gpu_marks: list[
    tuple[Any, Any]
] = []  # (event before, event after) of each queued copy, on the engine's stream


def _mark_gpu(owner: Any, name: str) -> None:
    """Record timing events around each queued copy on its engine's stream (GPU start and end)."""
    import cupy

    original = getattr(owner, name)

    @functools.wraps(original)
    def marked(engine: Any, *args: Any, **kwargs: Any) -> Any:
        with cupy.cuda.Device(engine.device):
            before = cupy.cuda.Event()
            before.record(engine.stream)
            out = original(engine, *args, **kwargs)
            after = cupy.cuda.Event()
            after.record(engine.stream)
        _gpu_marks.append((before, after))
        return out

    setattr(owner, name, marked)


def _wrap(owner: Any, name: str, label: str, stamp: bool = False) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            t1 = time.perf_counter()
            _spent[label].append(t1 - t0)
            _faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            if stamp:
                _events.append((t0, f"{label} begin"))
                _events.append((t1, f"{label} end"))

    setattr(owner, name, timed)


def _instrument() -> None:
    from kvstore import gpu, keys
    from kvstore.client import client as client_module
    from kvstore.client.sessions import SessionCache
    from kvstore.gpu import engine, transfer
    from kvstore.transports import base, shm

    for owner, name in (
        (keys, "as_token_array"),
        (keys, "sequence_digest"),
        (keys, "token_source"),
        (gpu, "caller_side"),
        (SessionCache, "claim_open"),
        (client_module.KVStoreClient, "_write"),
        (client_module.KVStoreClient, "_commit_result"),
        (shm.ShmTransport, "_check_slots"),
        (base.MappedRegionTransport, "check_before_write"),
        (transfer, "write_hashed"),
        (transfer, "_canonical_table"),
        (transfer, "fusable"),
        (transfer, "_pool_device_data"),
        (engine.GpuEngine, "wait_for"),
        (engine.GpuEngine, "upload_ops"),
        (engine.GpuEngine, "sync"),
    ):
        if hasattr(owner, name):
            _wrap(owner, name, name)
    for owner, name in (
        (client_module.KVStoreClient, "put_layer"),
        (engine.GpuEngine, "copy_hash_ops_queued"),
        (client_module, "_finish_checksums"),
    ):
        if hasattr(owner, name):
            _wrap(owner, name, name, stamp=True)
    _mark_gpu(engine.GpuEngine, "copy_hash_ops_queued")


def _pinned_copy_gbps() -> float:
    """The limit: one 1 GiB cudaMemcpy, GPU -> pinned host memory (median of 5)."""
    import cupy
    import cupyx

    nbytes = 1 << 30
    host = cupyx.empty_pinned(nbytes, dtype=np.uint8)
    device = cupy.ones(nbytes, dtype=cupy.uint8)
    times = []
    for _ in range(5):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        cupy.cuda.runtime.memcpy(
            host.ctypes.data, device.data.ptr, nbytes, cupy.cuda.runtime.memcpyDeviceToHost
        )
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1000)
    del host, device
    return nbytes / statistics.median(times) / 1e9


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs) if xs else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="")
    parser.add_argument("--layers", type=int, default=6, help="layers of 1 GiB per prompt")
    parser.add_argument("--sync-prompts", type=int, default=2, help="prompts written with put_layer")
    parser.add_argument("--async-prompts", type=int, default=3, help="prompts written with put_layer_async")
    parser.add_argument("--timeline", action="store_true", help="print the async sequences' timelines")
    parser.add_argument("--client", action="append", default=[], help="NAME=VALUE client setting")
    parser.add_argument(
        "--switch-ms", type=float, default=0.0, help="sys.setswitchinterval, ms (0: Python's)"
    )
    parser.add_argument(
        "--token-sequence", action="store_true", help="pass each prompt as one kvstore.TokenSequence"
    )
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="cProfile the synchronous middle layers; print the top functions",
    )
    args = parser.parse_args()
    layers, sync_prompts, async_prompts = args.layers, args.sync_prompts, args.async_prompts
    import cupy
    import torch

    from kvstore.gpu.engine import engine_for

    with Cluster(
        1,
        dram=str((sync_prompts + async_prompts) * PAGES * 64 * 1024 * layers + (1 << 30)),
        read_lease_ms=60000,
        write_lease_ms=120000,
    ) as cluster:
        if args.switch_ms:
            sys.setswitchinterval(args.switch_ms / 1000)
        settings: dict[str, Any] = {"copy_threads": 8}
        for item in args.client:
            name, _, value = item.partition("=")
            settings[name] = {"true": True, "false": False}.get(value, value)
        client = cluster.client("prof/gpu", **settings)
        layout = client.create_namespace(
            page_size=16, num_layers=layers, kind="mha", kv_heads=8, head_dim=128, dtype="bfloat16"
        )
        kv = [
            torch.randint(0, 255, (PAGES, layout.segment_bytes), dtype=torch.uint8, device="cuda")
            for _ in range(layers)
        ]
        warm = prompt(99, 4 * 16)
        for layer in range(layers):
            client.put_layer(warm, layer, kv[layer][:4])
        from kvstore import keys

        alone = prompt(5, PAGES * 16)
        for _ in range(3):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            keys.as_token_array(alone)
            print(
                f"as_token_array alone: {1000 * (time.perf_counter() - t0):.3f} ms, "
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0} page faults"
            )
        _instrument()
        limit = _pinned_copy_gbps()
        print(f"single 1 GiB pinned copy (GPU -> host): {limit:.1f} GB/s")
        result: dict[str, Any] = {"sync": {}, "async": [], "pinned_copy_GBps": limit}
        # synchronous middle layers: host phases
        calls: list[float] = []
        profiler = cProfile.Profile() if args.cprofile else None

        def request_tokens(seed: int) -> Any:
            tokens = prompt(seed, PAGES * 16)
            return keys.TokenSequence(tokens) if args.token_sequence else tokens

        for rep in range(sync_prompts):
            tokens = request_tokens(rep)
            for layer in range(layers):
                before = {label: len(values) for label, values in _spent.items()}
                fbefore = {label: len(values) for label, values in _faults.items()}
                middle = 0 < layer < layers - 1
                if profiler is not None and middle:
                    profiler.enable()
                t0 = time.perf_counter()
                client.put_layer(tokens, layer, kv[layer])
                if profiler is not None and middle:
                    profiler.disable()
                if middle:
                    calls.append(time.perf_counter() - t0)
                else:  # the first (OpenPut) and last (final commit) layers: not the per-call phases
                    for label, values in _spent.items():
                        del values[before.get(label, 0) :]
                    for label, counts in _faults.items():
                        del counts[fbefore.get(label, 0) :]
        _events.clear()
        median = _median_ms(calls)
        ratio = (PAGES * layout.segment_bytes / median * 1000 / 1e9) / limit
        print(
            f"sync put_layer (middle layers, {len(calls)} calls): median {median:.2f} ms, {ratio:.1%} of the copy"
        )
        for label, values in sorted(_spent.items(), key=lambda kv_: -sum(kv_[1])):
            per_call = sum(values) / max(len(calls), 1)
            faults = sum(_faults[label]) / max(len(calls), 1)
            print(
                f"  {label:34s} {1000 * per_call:7.3f} ms per call ({len(values)} calls), {faults:6.0f} page faults"
            )
            result["sync"][label] = 1000 * per_call
        result["sync"]["put_layer_median_ms"] = _median_ms(calls)
        if profiler is not None:
            report = io.StringIO()
            pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(35)
            print(f"cProfile of the {len(calls)} middle-layer calls (tottime, then cumulative):")
            print(report.getvalue())
            report = io.StringIO()
            pstats.Stats(profiler, stream=report).sort_stats("cumulative").print_stats(30)
            print(report.getvalue())
        # pipelined async sequence: timeline
        for rep in range(async_prompts):
            tokens = request_tokens(1000 + rep)
            client.put_layer_async(tokens, 0, kv[0]).result(120)
            _events.clear()
            _gpu_marks.clear()
            gpu_engine = engine_for(kv[0].device.index)
            reference = cupy.cuda.Event()
            reference.record(gpu_engine.stream)
            t0 = time.perf_counter()
            for layer in range(1, layers):
                _events.append((time.perf_counter(), f"submit {layer}"))
                client.put_layer_async(tokens, layer, kv[layer])
            client.flush(120)
            total = time.perf_counter() - t0
            gbps = (layers - 1) * PAGES * layout.segment_bytes / total / 1e9
            print(
                f"async rep {rep}: {layers - 1} layers after the first in {1000 * total:.1f} ms "
                f"({gbps:.1f} GB/s, {gbps / limit:.1%} of the copy)"
            )
            reference.synchronize()
            for i, (before, after) in enumerate(_gpu_marks):
                _events.append(
                    (t0 + cupy.cuda.get_elapsed_time(reference, before) / 1000, f"gpu copy {i} start")
                )
                _events.append(
                    (t0 + cupy.cuda.get_elapsed_time(reference, after) / 1000, f"gpu copy {i} end")
                )
            timeline = [(round(1000 * (t - t0), 3), what) for t, what in sorted(_events)]
            for at, what in timeline if args.timeline else ():
                print(f"  {at:9.3f} ms  {what}")
            result["async"].append({"total_ms": 1000 * total, "GBps": gbps, "timeline": timeline})
        client.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
