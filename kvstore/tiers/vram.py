"""The VRAM tier: one device allocation per node region, made with CuPy (optional ``gpu`` extra).

``--vram 10GiB:0`` asks for 10 GiB on GPU 0.  CuPy is imported lazily: a node
without it, or without a usable GPU, starts without the region and says so in
one log line.  The region is exported to same-host clients through a CUDA IPC
handle (RegionInfo.ipc_handle); slot offsets are byte offsets into it, 4 KiB
aligned, exactly as in the DRAM pool.

The node moves whole slots between this region and its DRAM pool on the
master's order (kvstore.node.moves): one stream, one async copy per slot
(a slot holds every layer of a page, so this is per page, never per segment),
one synchronize.  A checksum taken from the DRAM bytes when a slot is
copied into VRAM is kept and checked when the slot comes back; slots written by clients straight into VRAM have none and come back
unchecked (the GPU data path checksums on its own, DESIGN.md "Checksums").

Generations: the region's generation table (u32 per 4 KiB unit, as in the DRAM
pool header) lives in a small shared-memory file of its own, the *generation
file* (``kvstore-vramgen-<node>-<incarnation>`` in the node's shm directory,
advertised in RegionInfo/NodeRef.generation_path), so that a same-host CUDA-IPC
reader can re-check a slot's generation after its copy.  Its header carries the
node incarnation (the DRAM pool's) and the region size; the node holds its flock
for its whole life and orphans are swept at start, like pool files.

Data path for everyone else (:meth:`VramRegion.stage_in`/:meth:`stage_out`): the
node's TCP data server receives into / sends from a pinned staging buffer, and
one kernel launch (kvstore.gpu's ``kvs_copy_segments``) moves all ranges of the
request between it and the region.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import threading
import uuid
from typing import Any

import numpy as np

from kvstore.config import parse_size
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.base import (
    SLOT_UNIT,
    SlotChecksums,
    Tier,
    created_locked,
    map_region_file,
    sweep_region_files,
)

log = logging.getLogger("kvstore.tiers.vram")

GEN_MAGIC = b"KVSVGEN1"
GEN_VERSION = 1
GEN_HEADER_BYTES = 4096
GEN_PREFIX = "kvstore-vramgen-"
GEN_STAGING_PREFIX = f".{GEN_PREFIX}staging-"
# magic, version, incarnation, region bytes, table entries, owner pid
_GEN_HEADER = struct.Struct("<8sI16sQQI")

_H2D, _D2H = 1, 2  # cudaMemcpyKind


def parse_spec(text: str) -> tuple[int, int]:
    """``"10GiB:0"`` -> (bytes, device ordinal); the device defaults to 0."""
    size, _, device = text.partition(":")
    capacity = parse_size(size) // SLOT_UNIT * SLOT_UNIT
    if capacity <= 0:
        raise ValueError(f"--vram wants SIZE[:GPU] (e.g. 10GiB:0), got {text!r}")
    try:
        ordinal = int(device) if device.strip() else 0
    except ValueError:
        raise ValueError(f"--vram GPU must be a device number, got {device!r}") from None
    return capacity, ordinal


def unavailable_reason(device: int = 0) -> str:
    """Why a VRAM region cannot be made here ('' when it can): for the node's log line and test skips."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install kvstore[gpu])"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means no GPU here
        return f"no usable CUDA device ({exc})"
    if not 0 <= device < count:
        return f"GPU {device} does not exist ({count} visible)"
    return ""


def open_region(
    capacity: int, device: int, directory: str = "", node_id: str = "", incarnation: bytes = b""
) -> VramRegion | None:
    """A VRAM region, or None (logged once) when CUDA is not available.

    With ``directory`` its generation table goes in a generation file there (same-host readers).
    """
    why = unavailable_reason(device)
    if why:
        log.warning("VRAM tier off: %s", why)
        return None
    table = GenerationFile.create(directory, node_id, incarnation, capacity) if directory else None
    try:
        return VramRegion(capacity, device, table)
    except BaseException:
        if table is not None:
            table.close(unlink=True)
        raise


class GenerationFile:
    """The VRAM region's generation table in a shared-memory file: the node's (owner) or a reader's view."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, incarnation: bytes, region_bytes: int, owner: bool):
        self.path = path
        self._fd = fd
        self._mm = mm
        self.incarnation = incarnation
        self.region_bytes = region_bytes
        self.owner = owner
        self.table = np.frombuffer(mm, dtype="<u4", count=region_bytes // SLOT_UNIT, offset=GEN_HEADER_BYTES)

    @classmethod
    def create(cls, directory: str, node_id: str, incarnation: bytes, region_bytes: int) -> GenerationFile:
        sweep_orphans(directory)
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in node_id)
        tag = (incarnation or uuid.uuid4().bytes).hex()[:12]
        path = os.path.join(directory, f"{GEN_PREFIX}{safe_id}-{tag}")
        entries = region_bytes // SLOT_UNIT
        total = GEN_HEADER_BYTES + entries * 4
        # Created under a name sweepers ignore and renamed once locked (as pool files are).
        staging = os.path.join(directory, f"{GEN_STAGING_PREFIX}{uuid.uuid4().hex}")
        with created_locked(staging, path) as fd:
            os.posix_fallocate(fd, 0, total)
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _GEN_HEADER.pack_into(mm, 0, GEN_MAGIC, GEN_VERSION, incarnation, region_bytes, entries, os.getpid())
        return cls(path, fd, mm, incarnation, region_bytes, owner=True)

    @classmethod
    def attach(cls, path: str, incarnation: bytes) -> GenerationFile:
        """A reader's read-only view; STALE_INCARNATION unless the header names ``incarnation``."""
        fd, mm, size = map_region_file(path, GEN_HEADER_BYTES, False, "VRAM generation file")
        magic, version, owner_incarnation, region_bytes, entries, _ = _GEN_HEADER.unpack_from(mm, 0)
        if (
            magic != GEN_MAGIC
            or version != GEN_VERSION
            or owner_incarnation != incarnation
            or GEN_HEADER_BYTES + entries * 4 > size
        ):
            mm.close()
            os.close(fd)
            raise KVStoreError(
                ErrorCode.STALE_INCARNATION,
                f"VRAM generation file {path} belongs to another node incarnation",
            )
        return cls(path, fd, mm, owner_incarnation, region_bytes, owner=False)

    def generation(self, slot_offsets: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT].copy()

    def close(self, unlink: bool | None = None) -> None:
        del self.table
        try:
            self._mm.close()
        except BufferError:
            log.debug("generation file %s still viewed; the mapping goes with the process", self.path)
        if unlink if unlink is not None else self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)


def sweep_orphans(directory: str) -> list[str]:
    """Remove generation files whose node died (nobody holds their flock)."""
    return sweep_region_files(directory, GEN_PREFIX, GEN_STAGING_PREFIX, "VRAM generation file")


class VramRegion(SlotChecksums, Tier):
    tier = "vram"
    UNKNOWN_PASSES = (
        True  # a client's IPC write leaves no sum; the demotion's copy is checked against those it has
    )
    data_address = 0  # device memory: not addressable by the native host copy engine

    def __init__(self, capacity: int, device: int, generation_file: GenerationFile | None = None) -> None:
        import cupy

        self._cupy: Any = cupy
        self.device = device
        self._capacity = capacity
        with cupy.cuda.Device(device):
            # A dedicated cudaMalloc, not CuPy's pool: an IPC handle names the start of an allocation,
            # so the region must be one, or IPC readers would land at the wrong offset.
            self._memory = cupy.cuda.MemoryPointer(cupy.cuda.Memory(capacity), 0)
            self._memory.memset(0, capacity)
            self._stream = cupy.cuda.Stream(non_blocking=True)
        self.device_address = int(self._memory.ptr)
        self.ipc_handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self.device_address))
        units = capacity // SLOT_UNIT
        # Same-host CUDA-IPC readers re-check generations in the generation file; without one
        # (unit tests) the table is private to this process.
        self.generation_file = generation_file
        self.generation_path = generation_file.path if generation_file is not None else ""
        self.generations = (
            generation_file.table if generation_file is not None else np.zeros(units, dtype=np.uint32)
        )
        self.bytes_written = 0
        self.bytes_read = 0
        self._staging: Any = None  # kvstore.gpu.hostreg.StagingBuffer of the data server, made at first use
        self._staging_lock = threading.Lock()
        self._init_checksums(capacity)
        log.info("vram region: %d bytes on GPU %d", capacity, device)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def data_view(self) -> memoryview:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "the VRAM tier is device memory")

    def _copies(
        self,
        dsts: np.ndarray,
        srcs: np.ndarray,
        sizes: np.ndarray,
        kind: int,
        host_span: tuple[int, int] | None = None,
    ) -> None:
        """Copy (dst, src, size) rows between the region and host memory, completed on return.

        ``host_span`` (base address, bytes): the host mapping every host-side address lies in
        (the node's DRAM pool).  It is registered with CUDA once (mapped), and then the whole
        request is ONE launch of the segment kernel over device-visible pointers.  Without
        it (host memory the caller will not have registered) each row is one cudaMemcpyAsync.
        """
        if host_span is not None and len(dsts):
            from kvstore.gpu import hostreg

            base, nbytes = host_span
            shift = hostreg.device_pointer(base, nbytes, self.device) - base  # 0 under unified addressing
            host_side = dsts if kind == _D2H else srcs
            lo, hi = int(host_side.min()), int((host_side + sizes.astype(np.uint64)).max())
            if lo < base or hi > base + nbytes:
                raise KVStoreError(ErrorCode.BAD_RANGE, "host side of a VRAM move outside its host mapping")
            moved = (host_side.astype(np.int64) + shift).astype(np.uint64)
            if kind == _D2H:
                self._kernel_copy(moved, srcs, sizes.astype(np.uint64))
            else:
                self._kernel_copy(dsts, moved, sizes.astype(np.uint64))
            return
        runtime = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(self.device):
            for dst, src, size in zip(dsts.tolist(), srcs.tolist(), sizes.tolist(), strict=True):
                runtime.memcpyAsync(dst, src, size, kind, self._stream.ptr)
            self._stream.synchronize()

    def copy_to_host(
        self,
        slot_offsets: np.ndarray,
        addresses: np.ndarray,
        sizes: np.ndarray,
        host_span: tuple[int, int] | None = None,
    ) -> None:
        """Slots -> host memory (the node's DRAM pool: ``host_span`` makes it one kernel launch)."""
        srcs = np.uint64(self.device_address) + np.asarray(slot_offsets, dtype=np.uint64)
        self._copies(np.asarray(addresses, dtype=np.uint64), srcs, np.asarray(sizes), _D2H, host_span)

    def copy_from_host(
        self,
        slot_offsets: np.ndarray,
        addresses: np.ndarray,
        sizes: np.ndarray,
        host_span: tuple[int, int] | None = None,
    ) -> None:
        """Host memory -> slots (``host_span`` as for :meth:`copy_to_host`)."""
        dsts = np.uint64(self.device_address) + np.asarray(slot_offsets, dtype=np.uint64)
        self._copies(dsts, np.asarray(addresses, dtype=np.uint64), np.asarray(sizes), _H2D, host_span)

    # -- the TCP data server's path (kvstore.node.data_server): stage through pinned host memory
    @contextlib.contextmanager
    def staged(self, ranges: np.ndarray, to_region: bool) -> Any:
        """Hold the staging buffer for ``ranges`` ((slot-area start, length) rows, request order).

        Yields the staging buffer's (host address, length) rows, back to back in request
        order, for the native socket calls.  ``to_region=False``: the ranges are copied out
        of the region into the buffer before it is yielded (one launch, completed);
        ``to_region=True``: the caller fills the buffer and calls the yielded object's
        ``land()`` to copy it into the region (one launch, completed).
        """
        from kvstore.gpu import hostreg

        lengths = np.asarray(ranges[:, 1], dtype=np.uint64)
        total = int(lengths.sum())
        within = np.cumsum(lengths) - lengths  # offset of each range in the staging buffer
        with self._staging_lock:
            if self._staging is None:
                self._staging = hostreg.StagingBuffer(self.device)
            staging = self._staging
            staging.view(max(total, 1))
            host_rows = np.stack((np.uint64(staging.address) + within, lengths), axis=1)
            device_side = np.uint64(staging.device_address) + within
            region_side = np.uint64(self.device_address) + np.asarray(ranges[:, 0], dtype=np.uint64)
            if not to_region:
                self._kernel_copy(device_side, region_side, lengths)
                self.bytes_read += total
            lander = _Lander(self, region_side, device_side, lengths)
            yield host_rows, lander
            if to_region and lander.landed:
                self.bytes_written += total

    def _kernel_copy(self, dsts: np.ndarray, srcs: np.ndarray, lengths: np.ndarray) -> None:
        """One launch of kvstore.gpu's segment kernel over (dst, src, len) rows, completed."""
        from kvstore.gpu.engine import engine_for

        engine = engine_for(self.device)
        table = np.stack((dsts, srcs, lengths), axis=1).astype(np.uint64)
        with engine:
            engine.copy_segments(table)
            engine.sync()

    def close(self, unlink: bool | None = None) -> None:
        if self._staging is not None:
            self._staging.release()
            self._staging = None
        self._memory = None
        if self.generation_file is not None:
            self.generations = np.zeros(0, dtype=np.uint32)
            self.generation_file.close(unlink)
            self.generation_file = None


class _Lander:
    """What :meth:`VramRegion.staged` yields for a write: copies the filled staging buffer in."""

    def __init__(
        self, region: VramRegion, region_side: np.ndarray, device_side: np.ndarray, lengths: np.ndarray
    ):
        self._region = region
        self._table = (region_side, device_side, lengths)
        self.landed = False

    def land(self) -> None:
        self._region._kernel_copy(*self._table)
        self.landed = True
