"""What the storage node needs from a memory tier (DESIGN.md, "Memory, slots and placements").

A tier region is an array of 4 KiB-aligned slots addressed by byte offset into
its slot area, plus a generation table (u32 per 4 KiB unit) that readers can
see.  The node keeps the generations in step with the master's slot updates and
serves the bytes over the TCP data server.  The DRAM pool implements this now;
VRAM (CuPy) and NVMe (preallocated files) regions slot in behind the same calls.

Byte access is through ``data_view`` (a writable view of the slot area) and
``data_address`` (its address, for the native copy/hash engine); a tier whose
bytes are not host memory stages through host memory behind these calls.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import logging
import mmap
import os
import time
from collections.abc import Iterator

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError

log = logging.getLogger("kvstore.tiers")

# Slot offsets and generation entries are in units of this many bytes.
SLOT_UNIT = 4096


@contextlib.contextmanager
def created_locked(staging: str, path: str) -> Iterator[int]:
    """Create a region file at ``path`` and yield its descriptor, flock'd for the owner's life.

    The file is created under ``staging`` (a name sweepers ignore) and renamed once
    locked, so another node's orphan sweep never sees it unlocked.  If the body
    raises, the descriptor is closed and nothing is left behind.
    """
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, path)
        yield fd
    except BaseException:
        os.close(fd)
        for leftover in (staging, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        raise


def map_region_file(path: str, min_bytes: int, writable: bool, what: str) -> tuple[int, mmap.mmap, int]:
    """(fd, mapping, size) of another process's region file (a pool, a VRAM generation table).

    STALE_INCARNATION when it cannot be opened or is shorter than ``min_bytes``: the
    owner is gone or restarted.  A writable mapping is populated now (MAP_POPULATE: the
    first copy into a fresh mapping otherwise runs at a fifth of memcpy speed, measured).
    The caller checks the header's incarnation and closes both on a mismatch.
    """
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as exc:
        raise KVStoreError(ErrorCode.STALE_INCARNATION, f"cannot open {what} {path}: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        if size < min_bytes:
            raise KVStoreError(ErrorCode.STALE_INCARNATION, f"{what} {path} is truncated")
        if writable:
            flags, prot = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ | mmap.PROT_WRITE
        else:
            flags, prot = mmap.MAP_SHARED, mmap.PROT_READ
        return fd, mmap.mmap(fd, size, flags, prot), size
    except BaseException:
        os.close(fd)
        raise


def remove_if_orphaned(path: str, what: str) -> bool:
    """Unlink a region file whose owner died: a live node holds its flock for its whole life."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        log.warning("swept orphaned %s %s", what, path)
        return True
    finally:
        os.close(fd)


# A staging file younger than this may belong to a node still creating its region.
STAGING_GRACE_S = 60.0


def sweep_region_files(directory: str, prefix: str, staging_prefix: str, what: str) -> list[str]:
    """Remove the region files (``prefix``) in ``directory`` whose node died; returns their paths.

    Staging files (``staging_prefix``: a node died while creating its region) go too
    once older than STAGING_GRACE_S; a live owner holds its file's flock, so only
    dead nodes' files are removed (:func:`remove_if_orphaned`).
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    removed: list[str] = []
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(staging_prefix):
            with contextlib.suppress(OSError):
                if time.time() - os.path.getmtime(path) < STAGING_GRACE_S:
                    continue
        elif not name.startswith(prefix):
            continue
        if remove_if_orphaned(path, what):
            removed.append(path)
    return removed


class SlotChecksums:
    """The xxh3 of each slot's bytes as a node move wrote them (at the slot's first unit).

    Regions whose slots a node copies into and out of (VRAM, NVMe) keep it so that the
    copy back out is verified.  ``UNKNOWN_PASSES``: a slot written by a client, not a
    move, has no recorded sum (0) and passes (VRAM); NVMe is written by moves only.
    """

    UNKNOWN_PASSES = False
    checksums: np.ndarray

    def _init_checksums(self, capacity: int) -> None:
        self.checksums = np.zeros(capacity // SLOT_UNIT, dtype=np.uint64)

    def remember(self, slot_offsets: np.ndarray, sums: np.ndarray) -> None:
        self.checksums[_units(slot_offsets)] = sums

    def verify(self, slot_offsets: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """Which slots' bytes (hashed as ``sums``) are the ones remembered."""
        stored = self.checksums[_units(slot_offsets)]
        good = stored == sums
        return np.asarray(good | (stored == 0) if self.UNKNOWN_PASSES else good)


def _units(slot_offsets: np.ndarray) -> np.ndarray:
    return (np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT).astype(np.int64)


class Tier(abc.ABC):
    """One memory region of a node: slots, their generations and their bytes."""

    #: "dram", "vram" or "nvme": the name the master and the stats use.
    tier: str
    #: address of the first byte of the slot area (host memory), for native copies and hashes.
    data_address: int

    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes of the slot area."""

    #: the generation table: u32 per SLOT_UNIT of the slot area, where readers see it
    generations: np.ndarray

    def generation(self, slot_offsets: np.ndarray) -> np.ndarray:
        """Current generation (u32) of each slot, as readers see it."""
        return self.generations[np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT].copy()

    def set_generation(self, slot_offsets: np.ndarray, generations: np.ndarray) -> None:
        """Publish new generations for these slots (assignment or free)."""
        self.generations[np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT] = generations

    @abc.abstractmethod
    def data_view(self) -> memoryview:
        """A writable byte view of the whole slot area (offset 0 is slot offset 0)."""

    @abc.abstractmethod
    def close(self, unlink: bool | None = None) -> None:
        """Release the region (the owner also removes what it created)."""
