"""The NVMe tier: one preallocated file per node region (DESIGN.md, "Tiers and eviction").

The region is a file of ``capacity`` bytes in a directory given by flag
(``--nvme 200GiB:/mnt/nvme0``), reserved with ``posix_fallocate`` at start so a
full disk fails then, not on a demotion later.  Slot offsets are byte offsets
into the file, 4 KiB aligned, exactly as in the DRAM pool; whole slots move.

I/O goes through ``O_DIRECT`` where the filesystem allows it (the page cache
would only double the memory a cache tier is meant to relieve); the probe at
start writes and reads one aligned block, and a filesystem that refuses it
(tmpfs, some overlays) gets buffered I/O and one log line.  Buffers are the
node's DRAM pool itself: its slots are 4 KiB aligned in a page-aligned
mapping, so no bounce buffer is needed.  Requests are coalesced (adjacent in
the file and in memory), split over ``io_threads`` threads that each issue
``pwrite``/``preadv`` with the GIL released, so several are in flight.

The region is not one-sided: clients never read it.  Its generation table is
plain process memory, and an xxh3 per slot, taken from the source bytes as
they are demoted, is checked when the bytes come back (promotion), so a slot
the disk corrupted becomes a miss, never wrong bytes.

Files carry an exclusive ``flock`` for the node's life; files nobody holds a
lock on are orphans of dead nodes and are swept at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvstore.config import parse_size
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.base import SLOT_UNIT, SlotChecksums, Tier, created_locked, sweep_region_files

log = logging.getLogger("kvstore.tiers.nvme")

FILE_PREFIX = "kvstore-nvme-"
STAGING_PREFIX = ".kvstore-nvme-staging-"
MAX_IO_BYTES = 8 << 20  # one pread/pwrite at most (coalesced runs are cut here)
DIRECT_MODES = ("auto", "on", "off")


def parse_spec(text: str) -> tuple[int, str]:
    """``"200GiB:/mnt/nvme0"`` -> (bytes, directory); ValueError with an example otherwise."""
    size, sep, directory = text.partition(":")
    if not sep or not directory.strip():
        raise ValueError(f"--nvme wants SIZE:DIRECTORY (e.g. 200GiB:/mnt/nvme0), got {text!r}")
    capacity = parse_size(size) // SLOT_UNIT * SLOT_UNIT
    if capacity <= 0:
        raise ValueError(f"--nvme size must be at least {SLOT_UNIT} bytes, got {size!r}")
    return capacity, directory.strip()


def _address_view(address: int, length: int) -> memoryview:
    """A writable view of ``length`` bytes of this process's memory at ``address``."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def coalesce(
    file_offsets: np.ndarray, addresses: np.ndarray, lengths: np.ndarray, limit: int = MAX_IO_BYTES
) -> np.ndarray:
    """Merge ops adjacent both in the file and in memory: rows (file offset, address, length), u64.

    Runs are cut at ``limit`` bytes so a big run still spreads over threads.
    """
    n = len(file_offsets)
    if n == 0:
        return np.zeros((0, 3), dtype=np.uint64)
    order = np.argsort(file_offsets, kind="stable")
    off = file_offsets[order].astype(np.int64)
    addr = addresses[order].astype(np.int64)
    length = lengths[order].astype(np.int64)
    starts = np.ones(n, dtype=bool)
    starts[1:] = (off[:-1] + length[:-1] != off[1:]) | (addr[:-1] + length[:-1] != addr[1:])
    # cut runs longer than the limit: a new piece wherever the bytes before an op in its run
    # enter another multiple of the limit
    run_id = np.cumsum(starts) - 1
    before = np.cumsum(length) - length  # bytes before each op overall
    within = before - before[np.flatnonzero(starts)][run_id]
    starts[1:] |= (within[1:] // limit) != (within[:-1] // limit)
    first = np.flatnonzero(starts)
    totals = np.add.reduceat(length, first)
    return np.stack((off[first], addr[first], totals), axis=1).astype(np.uint64)


def _split_by_bytes(ops: np.ndarray, parts: int) -> list[np.ndarray]:
    """About equal byte shares of ``ops`` (rows kept whole) for ``parts`` threads."""
    if len(ops) <= 1 or parts <= 1:
        return [ops] if len(ops) else []
    cum = np.cumsum(ops[:, 2].astype(np.int64))
    bounds = np.searchsorted(cum, np.linspace(0, cum[-1], parts + 1)[1:-1], side="left")
    pieces = np.split(ops, np.unique(bounds + 1))
    return [p for p in pieces if len(p)]


class NvmeRegion(SlotChecksums, Tier):
    """A node's NVMe region: a locked, preallocated file and its I/O threads."""

    tier = "nvme"
    data_address = 0  # not host memory: copies go through write_from / read_into

    def __init__(self, path: str, fd: int, capacity: int, direct: bool, io_threads: int) -> None:
        self.path = path
        self._fd = fd
        self._capacity = capacity
        self.direct = direct
        self.io_threads = max(1, io_threads)
        self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="kvstore-nvme")
        units = capacity // SLOT_UNIT
        self.generations = np.zeros(units, dtype=np.uint32)
        self._init_checksums(capacity)  # each slot's xxh3 as demoted
        self.bytes_written = 0
        self.bytes_read = 0
        self._lock = threading.Lock()

    # -- creation
    @classmethod
    def create(
        cls, directory: str, node_id: str, capacity: int, direct: str = "auto", io_threads: int = 4
    ) -> NvmeRegion:
        if direct not in DIRECT_MODES:
            raise ValueError(f"nvme_direct must be one of {', '.join(DIRECT_MODES)}, got {direct!r}")
        if capacity < SLOT_UNIT or capacity % SLOT_UNIT:
            raise ValueError(f"NVMe region size must be a positive multiple of {SLOT_UNIT}, got {capacity}")
        os.makedirs(directory, exist_ok=True)
        sweep_orphans(directory)
        tag = uuid.uuid4().hex
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in node_id)
        path = os.path.join(directory, f"{FILE_PREFIX}{safe_id}-{tag[:12]}")
        staging = os.path.join(directory, f"{STAGING_PREFIX}{tag}")
        with created_locked(staging, path) as fd:
            try:
                os.posix_fallocate(fd, 0, capacity)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise OSError(
                        exc.errno,
                        f"cannot reserve {capacity} bytes for the NVMe tier in {directory}: {exc.strerror}",
                    ) from exc
                os.ftruncate(fd, capacity)  # no fallocate on this filesystem: sparse file
            io_fd = fd
            use_direct = False
            if direct != "off":
                io_fd, use_direct, why = _open_direct(path)
                if not use_direct:
                    if direct == "on":
                        raise OSError(errno.EINVAL, f"O_DIRECT refused in {directory}: {why}")
                    log.warning(
                        "NVMe tier %s: O_DIRECT not available (%s); using buffered I/O", directory, why
                    )
                    io_fd = fd
        region = cls(path, io_fd, capacity, use_direct, io_threads)
        region._lock_fd = fd
        log.info(
            "nvme region %s: %d bytes, %s I/O, %d threads",
            path,
            capacity,
            "direct" if use_direct else "buffered",
            region.io_threads,
        )
        return region

    _lock_fd: int = -1

    # -- Tier
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def data_view(self) -> memoryview:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "the NVMe tier is not mapped memory")

    def check_range(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        ends = np.asarray(offsets, dtype=np.uint64) + np.asarray(lengths, dtype=np.uint64)
        if len(ends) and int(ends.max()) > self._capacity:
            raise KVStoreError(ErrorCode.BAD_RANGE, "range outside the NVMe region")

    # -- I/O (blocking: call from a worker thread)
    def write_from(self, slot_offsets: np.ndarray, addresses: np.ndarray, lengths: np.ndarray) -> int:
        """Write ``lengths`` bytes at host ``addresses`` to the slots; returns bytes written."""
        done = self._on_io_threads(self._write_ops, slot_offsets, addresses, lengths)
        with self._lock:
            self.bytes_written += done
        return done

    def read_into(self, slot_offsets: np.ndarray, addresses: np.ndarray, lengths: np.ndarray) -> int:
        """Read the slots' first ``lengths`` bytes into host ``addresses``; returns bytes read."""
        done = self._on_io_threads(self._read_ops, slot_offsets, addresses, lengths)
        with self._lock:
            self.bytes_read += done
        return done

    def _on_io_threads(
        self,
        run: Callable[[np.ndarray], int],
        slot_offsets: np.ndarray,
        addresses: np.ndarray,
        lengths: np.ndarray,
    ) -> int:
        """Coalesced (slot offset, address, length) ops, split into equal shares of bytes per I/O thread."""
        self.check_range(slot_offsets, lengths)
        ops = coalesce(np.asarray(slot_offsets), np.asarray(addresses), np.asarray(lengths))
        return sum(self._pool.map(run, _split_by_bytes(ops, self.io_threads)))

    def _write_ops(self, ops: np.ndarray) -> int:
        total = 0
        for offset, address, length in ops.tolist():
            view = _address_view(address, length)
            done = 0
            while done < length:
                n = os.pwrite(self._fd, view[done:], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write to {self.path} at {offset + done}")
                done += n
            total += done
        return total

    def _read_ops(self, ops: np.ndarray) -> int:
        total = 0
        for offset, address, length in ops.tolist():
            view = _address_view(address, length)
            done = 0
            while done < length:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short read from {self.path} at {offset + done}")
                done += n
            total += done
        return total

    def close(self, unlink: bool | None = None) -> None:
        self._pool.shutdown(wait=True)
        if self._fd != self._lock_fd:
            os.close(self._fd)
        if unlink is None or unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _open_direct(path: str) -> tuple[int, bool, str]:
    """A second descriptor with O_DIRECT, probed with one aligned write and read: (fd, ok, why not)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1, False, "this platform has no O_DIRECT"
    try:
        fd = os.open(path, os.O_RDWR | flag)
    except OSError as exc:
        return -1, False, exc.strerror or str(exc)
    probe = mmap.mmap(-1, SLOT_UNIT)  # page aligned
    try:
        os.pwrite(fd, probe, 0)
        os.preadv(fd, [probe], 0)
    except OSError as exc:
        os.close(fd)
        return -1, False, exc.strerror or str(exc)
    finally:
        probe.close()
    return fd, True, ""


def sweep_orphans(directory: str) -> list[str]:
    """Remove NVMe region files whose node died (nobody holds their flock)."""
    return sweep_region_files(directory, FILE_PREFIX, STAGING_PREFIX, "NVMe region file")
