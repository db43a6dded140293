"""The GPU copy engine: native/gpu_kernels.cu compiled with NVRTC at first use, once per device.

One :class:`GpuEngine` per device holds the compiled module and a non-blocking
stream of its own.  Every transfer is one launch over a packed op table (all
segments of a layer batch, or of many layers); the table goes to the device on
the same stream.  Canonical arrays whose slots form a few runs of consecutive slots
move by the copy engines instead (:meth:`GpuEngine.copy_rects`: one
cudaMemcpy2DAsync per run, see kvstore/gpu/transfer.py).  Imports CuPy: only
loaded when a GPU array is actually passed.
"""

from __future__ import annotations

import collections
import importlib.resources
import pathlib
import threading
from collections.abc import Callable

import cupy
import numpy as np

THREADS = 512
BLOCKS_PER_SM = 2  # measured on an H100 (bench/gpu/bench_gpu.py sweep): 512 x 2 is among the best both ways
SPLIT_BYTES = 1 << 20  # ops longer than this are split, so that one long op never idles the grid
# Ranges up to this long (on average) are hashed a warp per range, longer ones a block per range
# (bench/gpu/bench_gpu.py --hash-only on an H100: a block per 4 KiB range ran at 152 GB/s).
WARP_HASH_BYTES = 16 << 10

_engines: dict[int, GpuEngine] = {}
_lock = threading.Lock()


def kernel_source() -> str:
    """native/gpu_kernels.cu: shipped inside the package, or read from the checkout."""
    packaged = importlib.resources.files("kvstore.gpu").joinpath("gpu_kernels.cu")
    if packaged.is_file():
        return packaged.read_text()
    checkout = pathlib.Path(__file__).resolve().parents[2] / "native" / "gpu_kernels.cu"
    return checkout.read_text()


def engine_for(device: int) -> GpuEngine:
    with _lock:
        engine = _engines.get(device)
        if engine is None:
            engine = _engines[device] = GpuEngine(device)
        return engine


def fusable(table: np.ndarray) -> bool:
    """Whether :meth:`GpuEngine.copy_hash_segments` takes these (dst, src, len) rows.

    Both sides 16-byte aligned, lengths a multiple of 16 and longer than XXH3's short forms
    (240 bytes): a store's shards of 64 KiB, or of any head range of a common head size.
    """
    rows = np.asarray(table, dtype=np.uint64).reshape(-1, 3)
    if not len(rows):
        return False
    return not np.any(np.bitwise_or.reduce(rows, axis=1) & np.uint64(15)) and int(rows[:, 2].min()) > 240


def split_long(table: np.ndarray, limit: int = SPLIT_BYTES) -> np.ndarray:
    """(dst, src, len) rows with every row longer than ``limit`` cut into ``limit``-byte pieces."""
    lengths = table[:, 2]
    if not len(table) or int(lengths.max()) <= limit:
        return table
    pieces = ((lengths + np.uint64(limit - 1)) // np.uint64(limit)).astype(np.int64)
    index = np.repeat(np.arange(len(table)), pieces)
    starts = np.cumsum(pieces) - pieces
    k = (np.arange(int(pieces.sum()), dtype=np.int64) - np.repeat(starts, pieces)).astype(np.uint64)
    offset = k * np.uint64(limit)
    out = np.empty((len(index), 3), dtype=np.uint64)
    out[:, 0] = table[index, 0] + offset
    out[:, 1] = table[index, 1] + offset
    out[:, 2] = np.minimum(table[index, 2] - offset, np.uint64(limit))
    return out


class GpuEngine:
    """Kernels and a stream on one device."""

    def __init__(self, device: int) -> None:
        self.device = device
        with cupy.cuda.Device(device):
            module = cupy.RawModule(code=kernel_source(), options=("--std=c++17",))
            self._segments = module.get_function("kvs_copy_segments")
            self._rows = module.get_function("kvs_copy_rows")
            self._xxh3 = module.get_function("kvs_xxh3_64")  # a block per range
            self._xxh3_warp = module.get_function("kvs_xxh3_64_warp")  # a warp per range
            self._copy_hash = module.get_function("kvs_copy_hash_segments")
            self.stream = cupy.cuda.Stream(non_blocking=True)
            sms = cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]
        self._sms = int(sms)
        self.configure(THREADS, BLOCKS_PER_SM)
        self._lock = threading.Lock()  # one transfer at a time per device: the stream is shared
        self._keep: cupy.ndarray | None = None
        self._keep_hash: tuple[cupy.ndarray, cupy.ndarray] | None = None
        self._hash_pinned: np.ndarray | None = None
        self._uploads: collections.deque[tuple[cupy.cuda.Event, np.ndarray]] = collections.deque()
        # Benchmarks set ``timing``: every transfer then records the GPU time of its copies
        # (events around them), read back as ``last_copy_s`` after the sync.
        self.timing = False
        self.last_copy_s = 0.0
        self._events: tuple[cupy.cuda.Event, cupy.cuda.Event] | None = None
        self._producer_event: cupy.cuda.Event | None = None

    def configure(self, threads: int, blocks_per_sm: int) -> None:
        """Launch shape: threads per block, and blocks per SM at most (benchmarks tune it)."""
        self.threads = threads
        self._max_blocks = self._sms * blocks_per_sm

    def __enter__(self) -> GpuEngine:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait_for(self, producer_stream: int | None) -> None:
        """Order this engine's stream after work the producer queued on ``producer_stream``.

        One event serves every call (under the engine's lock): a stream wait takes the
        event's state when it is queued, so recording it again later changes nothing for it.
        """
        if producer_stream is None:
            return
        runtime = cupy.cuda.runtime
        if self._producer_event is None:
            with cupy.cuda.Device(self.device):
                self._producer_event = cupy.cuda.Event(disable_timing=True)
        # Recorded by handle: the producer's stream is a raw pointer (array interface v3).
        runtime.eventRecord(self._producer_event.ptr, int(producer_stream))
        runtime.streamWaitEvent(self.stream.ptr, self._producer_event.ptr, 0)

    def _launch(self, kernel: cupy.RawKernel, table: np.ndarray, width: int) -> None:
        n = len(table)
        if n == 0:
            return
        packed = np.ascontiguousarray(table, dtype=np.uint64).reshape(n, width)
        with cupy.cuda.Device(self.device), self.stream:
            ops = cupy.asarray(packed)  # on this stream, ordered before the launch
            grid = min(n, self._max_blocks)
            kernel((grid,), (self.threads,), (ops, np.int64(n)), stream=self.stream)
            self._keep = ops  # the table must outlive the kernel: freed at the next launch or sync

    def copy_segments(self, table: np.ndarray) -> None:
        """Queue one launch moving every (dst, src, len) row (device or registered host pointers)."""
        self._launch(self._segments, split_long(np.asarray(table, dtype=np.uint64).reshape(-1, 3)), 3)

    def copy_rows(self, table: np.ndarray) -> None:
        """Queue one launch over (dst, src, row_bytes, rows, dst_pitch, src_pitch) rows."""
        self._launch(self._rows, table, 6)

    def hash_ranges(self, ranges: np.ndarray) -> np.ndarray:
        """Queue XXH3_64bits of every (device address, length) row (xxhash.h's value exactly).

        In order on the stream: after what is queued so far, before what comes next.
        Returns a pinned host array that holds the hashes after :meth:`sync` (reused by the
        next call: copy it out).  Not beside the copies on a second stream: on an H100 any
        kernel running beside a copy engine's transfer into registered (4 KiB-page) host
        memory slowed that transfer by ~2.4 ms per GiB, more than the ~1.3 ms the kernel
        takes by itself (bench/RESULTS.md, "GPU checksums").
        """
        table = np.asarray(ranges, dtype=np.uint64).reshape(-1, 2)
        n = len(table)
        if n == 0:
            return np.empty(0, dtype=np.uint64)
        host_ops, host_out = self._hash_buffers(n)
        host_ops[:] = table
        with cupy.cuda.Device(self.device), self.stream:
            ops = cupy.empty((n, 2), dtype=cupy.uint64)
            ops.set(host_ops, stream=self.stream)
            out = cupy.empty(n, dtype=cupy.uint64)
            if int(table[:, 1].mean()) <= WARP_HASH_BYTES:
                kernel, grid = self._xxh3_warp, min(-(-n // 8), self._sms * 8)
            else:
                kernel, grid = self._xxh3, min(n, self._sms * 8)
            kernel((grid,), (256,), (ops, np.int64(n), out), stream=self.stream)
            out.get(stream=self.stream, out=host_out, blocking=False)
        self._keep_hash = (ops, out)  # until the sync: the kernel and the copy-out use them
        return host_out

    def copy_hash_segments(self, table: np.ndarray) -> np.ndarray:
        """One launch that copies every (dst, src, len) row and hashes its bytes as it goes; waits for it.

        The hashes are :meth:`hash_ranges`' values, from the registers the copy already holds:
        no second pass over the bytes, no second kernel.  Rows must pass :func:`fusable`.
        """
        finish = self.copy_hash_segments_queued(table)
        self.sync()
        return finish()

    def copy_hash_segments_queued(self, table: np.ndarray) -> Callable[[], np.ndarray]:
        """Queue :meth:`copy_hash_segments`; returns a callable that waits for the copy (its
        event, not the stream) and returns the hashes.  Its buffers are its own (pinned memory
        from CuPy's pool), so later launches may be queued before it is called."""
        finish = self.copy_hash_ops_queued(self.upload_ops(table), 0, 0)
        return lambda: finish()[0]

    def upload_ops(self, table: np.ndarray, width: int = 3) -> cupy.ndarray:
        """Rows of ``width`` u64 as a device table on this engine's stream (ordered before later launches)."""
        import cupyx

        rows = np.asarray(table, dtype=np.uint64).reshape(-1, width)
        host_rows = cupyx.empty_pinned(rows.shape, dtype=np.uint64)
        host_rows[...] = rows
        with cupy.cuda.Device(self.device), self.stream:
            ops = cupy.empty(rows.shape, dtype=cupy.uint64)
            ops.set(host_rows, stream=self.stream)
            # the pinned rows must outlive the upload: kept until the stream passes this event
            uploaded = cupy.cuda.Event(disable_timing=True)
            uploaded.record(self.stream)
        self._uploads.append((uploaded, host_rows))
        while self._uploads and self._uploads[0][0].done:
            self._uploads.popleft()
        return ops

    def copy_hash_ops_queued(
        self,
        ops: cupy.ndarray,
        dst_base: int,
        src_base: int,
        checks: cupy.ndarray | None = None,
        generations_address: int = 0,
    ) -> Callable[[], tuple[np.ndarray, int]]:
        """One fused copy+hash launch over a device table (:meth:`upload_ops`) of rows relative to
        ``dst_base`` / ``src_base``; returns a callable that waits for it and returns (the hashes,
        the number of rows skipped).

        ``checks`` (a device table of (generation table index, generation) per row) and
        ``generations_address`` (a region's u32 generation table, as the device sees it): a row
        is copied only while its slot is still at that generation, checked by the kernel right
        before the row's bytes move.
        """
        import cupyx

        n = len(ops)
        host_out = cupyx.empty_pinned(n + 1, dtype=np.uint64)
        with cupy.cuda.Device(self.device), self.stream:
            out = cupy.zeros(n + 1, dtype=cupy.uint64)  # out[n]: rows skipped
            if n:
                grid = min(n, self._sms * 8)
                self._copy_hash(
                    (grid,),
                    (256,),
                    (
                        ops,
                        np.int64(n),
                        out,
                        np.uint64(dst_base),
                        np.uint64(src_base),
                        checks if checks is not None else np.uint64(0),
                        np.uint64(generations_address if checks is not None else 0),
                    ),
                    stream=self.stream,
                )
            out.get(stream=self.stream, out=host_out, blocking=False)
            done = cupy.cuda.Event(disable_timing=True)
            done.record(self.stream)
        buffers = [ops, out, checks]  # alive until the copy is done

        def finish() -> tuple[np.ndarray, int]:
            done.synchronize()
            buffers.clear()
            return host_out[:n].copy(), int(host_out[n])

        return finish

    def _hash_buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Pinned host memory for ``n`` (address, length) ops and their results (grown on demand, kept)."""
        if self._hash_pinned is None or len(self._hash_pinned) < 3 * n:
            import cupyx

            self._hash_pinned = cupyx.empty_pinned(max(3 * n, 3 << 14), dtype=np.uint64)
        return self._hash_pinned[: 2 * n].reshape(n, 2), self._hash_pinned[2 * n : 3 * n]

    def copy_rects(self, rects: np.ndarray) -> None:
        """Queue one cudaMemcpy2DAsync per (dst, dst_pitch, src, src_pitch, width, height) row.

        The copy engines move a strided region at the speed of one plain copy; a
        run of pages in consecutive slots is one region per layer and head run.
        """
        runtime = cupy.cuda.runtime
        with cupy.cuda.Device(self.device):
            for dst, dpitch, src, spitch, width, height in np.asarray(rects, dtype=np.uint64).tolist():
                runtime.memcpy2DAsync(
                    dst, dpitch, src, spitch, width, height, runtime.memcpyDefault, self.stream.ptr
                )

    def begin(self) -> None:
        """Mark the start of a transfer's copies (records an event when ``timing`` is on)."""
        if self.timing:
            with cupy.cuda.Device(self.device):
                if self._events is None:
                    self._events = (cupy.cuda.Event(), cupy.cuda.Event())
                self._events[0].record(self.stream)

    def memcpy(self, dst: int, src: int, nbytes: int) -> None:
        """One cudaMemcpyAsync on this stream (contiguous staging)."""
        with cupy.cuda.Device(self.device):
            cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, cupy.cuda.runtime.memcpyDefault, self.stream.ptr)

    def sync(self) -> None:
        """Wait until everything queued has finished (before a generation check, a hash, a return)."""
        timed = self.timing and self._events is not None
        if timed:
            assert self._events is not None
            self._events[1].record(self.stream)
        self.stream.synchronize()
        self._keep = self._keep_hash = None
        if timed:
            assert self._events is not None
            self.last_copy_s = cupy.cuda.get_elapsed_time(*self._events) / 1000.0
