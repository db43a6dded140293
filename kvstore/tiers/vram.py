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
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kvstore.config import parse_size
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.base import SLOT_UNIT, Tier

log = logging.getLogger("kvstore.tiers.vram")

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


def open_region(capacity: int, device: int) -> VramRegion | None:
    """A VRAM region, or None (logged once) when CUDA is not available."""
    why = unavailable_reason(device)
    if why:
        log.warning("VRAM tier off: %s", why)
        return None
    return VramRegion(capacity, device)


class VramRegion(Tier):
    tier = "vram"
    data_address = 0  # device memory: not addressable by the native host copy engine

    def __init__(self, capacity: int, device: int) -> None:
        import cupy

        self._cupy: Any = cupy
        self.device = device
        self._capacity = capacity
        with cupy.cuda.Device(device):
            self._memory = cupy.cuda.alloc(capacity)
            self._memory.memset(0, capacity)
            self._stream = cupy.cuda.Stream(non_blocking=True)
        self.device_address = int(self._memory.ptr)
        self.ipc_handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self.device_address))
        units = capacity // SLOT_UNIT
        self.generations = np.zeros(units, dtype=np.uint32)
        self.checksums = np.zeros(units, dtype=np.uint64)  # 0: unknown (written by a client)
        log.info("vram region: %d bytes on GPU %d", capacity, device)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def generation(self, slot_offsets: np.ndarray) -> np.ndarray:
        return self.generations[np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT].copy()

    def set_generation(self, slot_offsets: np.ndarray, generations: np.ndarray) -> None:
        self.generations[np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT] = generations

    def data_view(self) -> memoryview:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "the VRAM tier is device memory")

    def _copies(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, kind: int) -> None:
        runtime = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(self.device):
            for dst, src, size in zip(dsts.tolist(), srcs.tolist(), sizes.tolist(), strict=True):
                runtime.memcpyAsync(dst, src, size, kind, self._stream.ptr)
            self._stream.synchronize()

    def copy_to_host(self, slot_offsets: np.ndarray, addresses: np.ndarray, sizes: np.ndarray) -> None:
        """Slots -> host memory (the node's pinned-or-not DRAM pool)."""
        srcs = np.uint64(self.device_address) + np.asarray(slot_offsets, dtype=np.uint64)
        self._copies(np.asarray(addresses, dtype=np.uint64), srcs, np.asarray(sizes), _D2H)

    def copy_from_host(self, slot_offsets: np.ndarray, addresses: np.ndarray, sizes: np.ndarray) -> None:
        dsts = np.uint64(self.device_address) + np.asarray(slot_offsets, dtype=np.uint64)
        self._copies(dsts, np.asarray(addresses, dtype=np.uint64), np.asarray(sizes), _H2D)

    def remember(self, slot_offsets: np.ndarray, sums: np.ndarray) -> None:
        self.checksums[(np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT).astype(np.int64)] = sums

    def verify(self, slot_offsets: np.ndarray, sums: np.ndarray) -> np.ndarray:
        stored = self.checksums[(np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT).astype(np.int64)]
        return np.asarray((stored == 0) | (stored == sums))

    def close(self, unlink: bool | None = None) -> None:
        self._memory = None
