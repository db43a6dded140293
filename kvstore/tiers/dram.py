"""The DRAM tier: a shared-memory pool file (DESIGN.md, "Memory, slots and placements").

File layout (all little-endian)::

    0       header (4 KiB)  magic, version, incarnation, sizes, owner pid
    4096    generation table: u32 per 4 KiB unit of the data area
            (a slot's generation lives at the entry of its first unit)
    data_offset (2 MiB aligned)  the slot area, ``data_bytes`` long

The node creates it with ``os.open`` + ``posix_fallocate`` (a short tmpfs fails
here, not with SIGBUS later) + ``mmap`` and pre-faults it.  It holds an
exclusive ``flock`` for its whole life: a pool file nobody holds a lock on is an
orphan of a dead node and is swept at the next node start.

Clients on the same host open the same file (:meth:`DramPool.attach`) and copy
straight into it; "same host" means the file opens and its header carries the
incarnation the placement names.  ``multiprocessing.shared_memory`` is never
used: its resource tracker unlinks segments it merely opened.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import uuid
from dataclasses import dataclass

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.base import Tier, created_locked, map_region_file, sweep_region_files

log = logging.getLogger("kvstore.tiers.dram")

MAGIC = b"KVSPOOL1"
VERSION = 1
HEADER_BYTES = 4096
UNIT = 4096
DATA_ALIGN = 2 << 20
POOL_PREFIX = "kvstore-pool-"
STAGING_PREFIX = ".kvstore-staging-"
# magic, version, incarnation, data_offset, data_bytes, gen_offset, gen_entries, owner pid
_HEADER = struct.Struct("<8sI16sQQQQI")


@dataclass(frozen=True)
class PoolHeader:
    incarnation: bytes
    data_offset: int
    data_bytes: int
    gen_offset: int
    gen_entries: int
    owner_pid: int


def _data_offset(data_bytes: int) -> tuple[int, int]:
    gen_entries = data_bytes // UNIT
    gen_end = HEADER_BYTES + gen_entries * 4
    return (gen_end + DATA_ALIGN - 1) // DATA_ALIGN * DATA_ALIGN, gen_entries


def read_header(buf: bytes | memoryview | mmap.mmap) -> PoolHeader:
    magic, version, incarnation, data_offset, data_bytes, gen_offset, gen_entries, pid = _HEADER.unpack_from(
        buf, 0
    )
    if magic != MAGIC or version != VERSION:
        raise KVStoreError(ErrorCode.STALE_INCARNATION, "not a kvstore pool file (or another format version)")
    return PoolHeader(incarnation, data_offset, data_bytes, gen_offset, gen_entries, pid)


class DramPool(Tier):
    """A mapped pool file: the node's (owner) or a same-host client's (attached) view."""

    tier = "dram"

    def __init__(self, path: str, fd: int, mm: mmap.mmap, header: PoolHeader, owner: bool) -> None:
        self.path = path
        self._fd = fd
        self.mm = mm
        self.header = header
        self.owner = owner
        self.bytes = np.frombuffer(mm, dtype=np.uint8)
        self.generations = np.frombuffer(mm, dtype="<u4", count=header.gen_entries, offset=header.gen_offset)
        self.base_address = int(self.bytes.ctypes.data)
        self.data_address = self.base_address + header.data_offset

    # -- creation and attachment
    @classmethod
    def create(cls, directory: str, node_id: str, data_bytes: int, prefault: bool = True) -> DramPool:
        if data_bytes < UNIT or data_bytes % UNIT:
            raise ValueError(f"pool size must be a positive multiple of {UNIT} bytes, got {data_bytes}")
        sweep_orphans(directory)
        incarnation = uuid.uuid4().bytes
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in node_id)
        path = os.path.join(directory, f"{POOL_PREFIX}{safe_id}-{incarnation.hex()[:12]}")
        data_offset, gen_entries = _data_offset(data_bytes)
        total = data_offset + data_bytes
        # Created under a name sweepers ignore and renamed once locked: another node's
        # orphan sweep must never see this file unlocked.
        staging = os.path.join(directory, f"{STAGING_PREFIX}{incarnation.hex()}")
        with created_locked(staging, path) as fd:
            try:
                os.posix_fallocate(fd, 0, total)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot reserve {total} bytes for the DRAM pool in {directory}: "
                    f"{exc.strerror} (is the tmpfs large enough? see --dram/--shm-dir)",
                ) from exc
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        header = PoolHeader(incarnation, data_offset, data_bytes, HEADER_BYTES, gen_entries, os.getpid())
        _HEADER.pack_into(
            mm,
            0,
            MAGIC,
            VERSION,
            incarnation,
            data_offset,
            data_bytes,
            HEADER_BYTES,
            gen_entries,
            os.getpid(),
        )
        pool = cls(path, fd, mm, header, owner=True)
        if prefault:
            pool.prefault()
        log.info("dram pool %s: %d bytes, incarnation %s", path, data_bytes, incarnation.hex())
        return pool

    @classmethod
    def attach(cls, path: str, incarnation: bytes) -> DramPool:
        """Map another process's pool; raises STALE_INCARNATION if it is not the named incarnation."""
        fd, mm, size = map_region_file(path, HEADER_BYTES, True, "pool")
        header = read_header(mm)
        if header.incarnation != incarnation or header.data_offset + header.data_bytes > size:
            mm.close()
            os.close(fd)
            raise KVStoreError(
                ErrorCode.STALE_INCARNATION, f"pool {path} belongs to another node incarnation"
            )
        return cls(path, fd, mm, header, owner=False)

    def prefault(self) -> None:
        """Touch every page now: first touch runs at ~1 GB/s and must not land on the write path."""
        from kvstore import native

        step = 64 << 20
        # From HEADER_BYTES: zeroing the header would erase the magic and incarnation written before.
        ops = [
            (self.base_address + off, min(step, len(self.bytes) - off))
            for off in range(HEADER_BYTES, len(self.bytes), step)
        ]
        native.fill(np.array(ops, dtype=np.uint64), 0)

    # -- slots
    @property
    def capacity_bytes(self) -> int:
        return self.header.data_bytes

    def data_view(self) -> memoryview:
        start = self.header.data_offset
        return memoryview(self.mm)[start : start + self.header.data_bytes]

    def check_range(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        ends = offsets.astype(np.uint64) + lengths.astype(np.uint64)
        if len(offsets) and int(ends.max()) > self.header.data_bytes:
            raise KVStoreError(ErrorCode.BAD_RANGE, "range outside the pool's slot area")

    def close(self, unlink: bool | None = None) -> None:
        # registered with CUDA by a GPU transfer or a one-launch VRAM move: unregister before unmapping
        from kvstore.gpu import release_host_memory

        release_host_memory(self.base_address)
        del self.bytes, self.generations
        try:
            self.mm.close()
        except BufferError:
            # Someone still holds a view (numpy arrays handed out); the mapping goes with the process.
            log.debug("pool %s still has exported views; leaving the mapping to process exit", self.path)
        if unlink if unlink is not None else self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)


def sweep_orphans(directory: str) -> list[str]:
    """Remove pool files whose node died (nobody holds their flock)."""
    return sweep_region_files(directory, POOL_PREFIX, STAGING_PREFIX, "pool file")
