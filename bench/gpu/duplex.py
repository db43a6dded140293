"""How much PCIe bandwidth two processes sharing one GPU get, each direction alone and both at once.

The layer-streaming bench runs the prefill (device -> pinned host) and the decoder (pinned host ->
device) as two processes on one GPU; this measures the ceiling of that setup: copy engines in both
directions, or a copy kernel (the SDK's write path: stores into mapped host memory) against the copy
engine.  Prints and writes JSON (``--json``).  Needs torch with CUDA.

    python3 bench/gpu/duplex.py --mib 32 --seconds 1.5 --pitch-kib 2048 --json /tmp/duplex.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import multiprocessing as mp
import os
import time
from typing import Any

ROW = 64 << 10  # one segment


def _worker(
    direction: str, how: str, host: str, nbytes: int, pitch: int, seconds: float, start: Any, out: Any
) -> None:
    try:
        _measure(direction, how, host, nbytes, pitch, seconds, start, out)
    except BaseException as exc:
        out.put((direction, how, f"failed: {exc!r}"))
        raise


def _host_buffer(host: str, span: int, tag: str) -> tuple[int, Any]:
    """(address, keep-alive) of ``span`` host bytes the GPU can reach."""
    import cupy
    import torch

    if host == "pinned":
        buf = torch.empty(span, dtype=torch.uint8, pin_memory=True)
        return buf.data_ptr(), buf
    # the store's kind: a /dev/shm file mapped by each process and registered (4 KiB pages unless
    # the kernel backs tmpfs with huge pages)
    path = f"/dev/shm/kvs-duplex-{tag}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    if os.fstat(fd).st_size < span:
        os.ftruncate(fd, span)
    mm = mmap.mmap(fd, span, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    os.close(fd)
    if host != "shm-shared":
        os.unlink(path)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    cupy.cuda.runtime.hostRegister(address, span, 1 | 2)  # cudaHostRegisterPortable | Mapped
    return address, mm


def _measure(
    direction: str, how: str, host: str, nbytes: int, pitch: int, seconds: float, start: Any, out: Any
) -> None:
    import cupy
    import torch

    torch.cuda.init()
    rows = nbytes // ROW
    span = rows * pitch
    # shm-shared: both processes map one file; the reader's rows sit right after the writer's
    # (layer L + 1 being written while layer L is read, in the same page slots)
    shared = host == "shm-shared"
    address, keep = _host_buffer(host, span + ROW, "shared" if shared else f"{os.getpid()}")
    if shared and direction == "h2d":
        address += ROW
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    # host rows of ROW bytes every ``pitch`` bytes (pitch == ROW: one contiguous buffer)
    mem = cupy.cuda.UnownedMemory(address, span, keep, device_id=0)
    host_rows = cupy.ndarray(
        (rows, ROW // 16), dtype=cupy.complex128, memptr=cupy.cuda.MemoryPointer(mem, 0), strides=(pitch, 16)
    )
    dev_rows = cupy.asarray(device).view(cupy.complex128).reshape(rows, ROW // 16)
    to_device = direction == "h2d"

    def once() -> None:
        if how == "kernel":
            with cupy.cuda.ExternalStream(stream.cuda_stream):
                if to_device:
                    cupy.copyto(dev_rows, host_rows)
                else:
                    cupy.copyto(host_rows, dev_rows)
            return
        dst, dpitch, src, spitch = (
            (device.data_ptr(), ROW, address, pitch)
            if to_device
            else (address, pitch, device.data_ptr(), ROW)
        )
        kind = cupy.cuda.runtime.memcpyHostToDevice if to_device else cupy.cuda.runtime.memcpyDeviceToHost
        cupy.cuda.runtime.memcpy2DAsync(dst, dpitch, src, spitch, ROW, rows, kind, stream.cuda_stream)

    for _ in range(3):
        once()
    stream.synchronize()
    start.wait()
    t0 = time.perf_counter()
    copies = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            once()
        copies += 4
        stream.synchronize()
    out.put((direction, how, copies * nbytes / (time.perf_counter() - t0) / 1e9))


def _run(jobs: list[tuple[str, str]], host: str, nbytes: int, pitch: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(d, h, host, nbytes, pitch, seconds, start, out)) for d, h in jobs
    ]
    for p in procs:
        p.start()
    time.sleep(3.0)  # CUDA contexts and warm-up copies
    start.set()
    results = {f"{d}_{h}": gbps for d, h, gbps in (out.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join()
    if os.path.exists("/dev/shm/kvs-duplex-shared"):
        os.unlink("/dev/shm/kvs-duplex-shared")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="bytes per copy (one streamed layer: 32 MiB)")
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument(
        "--host",
        choices=("pinned", "shm", "shm-shared", "both"),
        default="both",
        help="host memory: torch's pinned buffer, or a registered /dev/shm mapping as the store's pool",
    )
    parser.add_argument(
        "--pitch-kib", type=int, default=64, help="distance of the host rows (a page slot of 32 layers: 2048)"
    )
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case (fresh processes each)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    nbytes = args.mib << 20
    cases = {
        "d2h_ce_alone": [("d2h", "ce")],
        "h2d_ce_alone": [("h2d", "ce")],
        "d2h_kernel_alone": [("d2h", "kernel")],
        "both_ce": [("d2h", "ce"), ("h2d", "ce")],
        "d2h_kernel_h2d_ce": [("d2h", "kernel"), ("h2d", "ce")],
        "both_kernel": [("d2h", "kernel"), ("h2d", "kernel")],
    }
    pitch = args.pitch_kib << 10
    result: dict[str, Any] = {"bytes_per_copy": nbytes, "row_bytes": ROW, "pitch": pitch}
    wanted = set(args.cases.split(",")) if args.cases else set(cases)
    for host in ("pinned", "shm") if args.host == "both" else (args.host,):
        for name, jobs in cases.items():
            if name not in wanted:
                continue
            runs = [_run(jobs, host, nbytes, pitch, args.seconds) for _ in range(args.repeat)]
            result[f"{host}_{name}"] = runs[0] if args.repeat == 1 else runs
            for run in runs:
                shown = {k: v if isinstance(v, str) else round(v, 1) for k, v in run.items()}
                print(host, name, shown, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
