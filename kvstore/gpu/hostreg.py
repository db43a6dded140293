"""Host memory the GPU reaches directly: registered pools and pinned staging buffers.

A same-host client's mapped DRAM pool is registered once per mapping
(``cudaHostRegister`` portable|mapped: every device, and the kernels address it
directly) and unregistered when the mapping is closed.  The TCP path stages GPU
bytes through a pinned buffer per device, grown on demand and reused, never
reallocated per call.  Imports CuPy.
"""

from __future__ import annotations

import logging
import mmap
import threading
from dataclasses import dataclass, field

import cupy
import numpy as np

log = logging.getLogger("kvstore.gpu")

HOST_REGISTER_PORTABLE = 1
HOST_REGISTER_MAPPED = 2


@dataclass
class _Registration:
    address: int
    nbytes: int
    device_pointers: dict[int, int] = field(default_factory=dict)


_registered: dict[int, _Registration] = {}
_lock = threading.Lock()


def device_pointer(address: int, nbytes: int, device: int) -> int:
    """The device-side address of registered host memory ``[address, address + nbytes)``; registers it once."""
    with _lock:
        reg = _registered.get(address)
        if reg is None:
            with cupy.cuda.Device(device):
                cupy.cuda.runtime.hostRegister(address, nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED)
            reg = _registered[address] = _Registration(address, nbytes)
            log.debug("registered %d bytes of host memory at %#x with CUDA", nbytes, address)
        elif reg.nbytes < nbytes:
            raise RuntimeError(
                f"host memory at {address:#x} registered with {reg.nbytes} bytes, {nbytes} asked for"
            )
        ptr = reg.device_pointers.get(device)
        if ptr is None:
            with cupy.cuda.Device(device):
                attrs = cupy.cuda.runtime.pointerGetAttributes(address)
            # Under unified addressing the device pointer is the host pointer; ask anyway.
            ptr = reg.device_pointers[device] = int(attrs.devicePointer) or address
        return ptr


def unregister(address: int) -> None:
    """Undo :func:`device_pointer`'s registration of the memory at ``address`` (no-op if not registered)."""
    with _lock:
        reg = _registered.pop(address, None)
    if reg is None:
        return
    try:
        cupy.cuda.runtime.hostUnregister(address)
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        log.debug("unregistering host memory at %#x: %s", address, exc)


class StagingBuffer:
    """A pinned, mapped host buffer of one device, reused by every staged transfer (hold it while in use)."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self.device_address = 0

    def view(self, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of the buffer as flat uint8 (grown, re-registered, if too small)."""
        if self._array is None or len(self._array) < nbytes:
            self.release()
            size = max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length())
            self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._array = np.frombuffer(self._map, dtype=np.uint8)
            address = int(self._array.ctypes.data)
            self.device_address = device_pointer(address, size, self.device)
        return self._array[:nbytes]

    @property
    def address(self) -> int:
        assert self._array is not None
        return int(self._array.ctypes.data)

    def release(self) -> None:
        if self._array is not None:
            unregister(int(self._array.ctypes.data))
            self._array = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still out there: the mapping goes with it
                log.debug("staging buffer still viewed; left to the garbage collector")
            self._map = None


_staging: dict[int, StagingBuffer] = {}


def staging_for(device: int) -> StagingBuffer:
    with _lock:
        buf = _staging.get(device)
        if buf is None:
            buf = _staging[device] = StagingBuffer(device)
        return buf
