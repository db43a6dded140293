"""Physical limits measured in the same run as the benchmark, and the machine it ran on.

* memcpy: one thread copying a pre-faulted buffer of >= 256 MiB into another
  with libc's memcpy (numpy's copyto).  A one-sided shm put or get is one such
  copy (plus the xxh3 done inside it), so this is the yardstick of the issue's
  targets.  The native copy engine's single-thread rate is measured beside it
  (``stream_copy_gbps``): for large ranges it uses streaming stores, which on
  some machines beat memcpy by a quarter, so it is the stricter bound and the
  results quote both.
* loopback: a sender process streaming into a receiver process over a TCP
  loopback socket, the receiver using ``recv_into`` a pre-allocated buffer with
  large chunks.  The TCP data path moves its bytes across exactly such a socket.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time
from typing import Any

import numpy as np

from kvstore import native
from kvstore.testing import spawn_context

CHUNK = 8 << 20


def memcpy_gbps(nbytes: int = 256 << 20, repeat: int = 3) -> dict[str, Any]:
    """Median single-thread copy rates (GB/s, 1e9 bytes): libc memcpy (numpy) and native.copy."""
    src = np.empty(nbytes, dtype=np.uint8)
    dst = np.empty(nbytes, dtype=np.uint8)
    src.fill(0x5A)  # fault every page in before timing
    dst.fill(0)
    numpy_times, native_times = [], []
    table = np.array([[native.address_of(dst), native.address_of(src), nbytes]], dtype=np.uint64)
    for _ in range(repeat):
        started = time.perf_counter()
        np.copyto(dst, src)
        numpy_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        native.copy(table, with_hashes=False, threads=1)
        native_times.append(time.perf_counter() - started)
    numpy_rate = nbytes / statistics.median(numpy_times) / 1e9
    native_rate = nbytes / statistics.median(native_times) / 1e9
    return {
        "memcpy_gbps": numpy_rate,
        "memcpy_numpy_gbps": numpy_rate,
        "memcpy_native_gbps": native_rate,
        "stream_copy_gbps": native_rate,
        "memcpy_numpy_runs_gbps": [nbytes / t / 1e9 for t in numpy_times],
        "memcpy_native_runs_gbps": [nbytes / t / 1e9 for t in native_times],
    }


def _receiver(port_queue: Any, result_queue: Any, total: int, repeat: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    listener.close()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    times = []
    with conn:
        for _ in range(repeat):
            got = 0
            started = time.perf_counter()
            while got < total:
                n = conn.recv_into(view, min(CHUNK, total - got))
                if n == 0:
                    raise ConnectionError("sender went away")
                got += n
            times.append(time.perf_counter() - started)
        conn.sendall(b"k")  # the sender waits for this, so neither side closes before the other is done
    result_queue.put(times)


def _sender(port: int, total: int, repeat: int) -> None:
    payload = np.full(CHUNK, 0xA5, dtype=np.uint8)
    view = payload.data
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for _ in range(repeat):
            sent = 0
            while sent < total:
                n = min(CHUNK, total - sent)
                conn.sendall(view[:n])
                sent += n
        conn.recv(1)


def loopback_gbps(total: int = 1 << 30, repeat: int = 3, timeout: float = 120.0) -> float:
    """Median rate (GB/s) of ``total`` bytes streamed process -> process over loopback TCP."""
    ctx = spawn_context()
    port_queue, result_queue = ctx.Queue(), ctx.Queue()
    receiver = ctx.Process(target=_receiver, args=(port_queue, result_queue, total, repeat), daemon=True)
    receiver.start()
    sender = None
    try:
        port = port_queue.get(timeout=timeout)
        sender = ctx.Process(target=_sender, args=(port, total, repeat), daemon=True)
        sender.start()
        times = result_queue.get(timeout=timeout)
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    return total / statistics.median(times) / 1e9


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": None,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "system": platform.system(),
        "numpy": np.__version__,
        "hostname": socket.gethostname(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    info["memory_bytes"] = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return info
