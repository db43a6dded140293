"""Recognise arrays by their memory description, without importing torch or CuPy.

Three ways in, tried in this order:

- ``__cuda_array_interface__`` (CuPy, Numba, PyTorch CUDA tensors of the dtypes it
  can describe);
- DLPack (``__dlpack_device__`` / ``__dlpack__``): the capsule's ``DLTensor`` is read
  with ctypes (it covers bfloat16 and float8 tensors, which PyTorch's array interface
  refuses), and the capsule is kept, unconsumed, for as long as the description
  lives, so the producer's memory stays alive;
- for CPU objects only, numpy's own views (``np.asarray`` of anything with the array
  interface or the buffer protocol).

The store moves raw bytes: a description gives the address, shape, byte strides,
item size and device, never a dtype.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError

CPU = -1  # device id of host memory

# DLPack device types (dlpack.h)
_DL_CPU = 1
_DL_CUDA = 2
_DL_CUDA_HOST = 3
_DL_CUDA_MANAGED = 13
_DEVICE_TYPES = (_DL_CUDA, _DL_CUDA_MANAGED)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@dataclass(frozen=True)
class ArrayInfo:
    """Where an array's bytes are: ``ptr`` on ``device`` (CPU = -1), with byte strides."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    itemsize: int
    device: int
    readonly: bool
    stream: int | None = None  # CUDA stream the producer last wrote on (array interface v3), if it said
    owner: Any = None  # keeps the memory (and a DLPack capsule) alive while this lives

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize if self.shape else self.itemsize

    @property
    def contiguous(self) -> bool:
        """C-contiguous (dimensions of size 1 may have any stride)."""
        expected = self.itemsize
        for size, stride in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    @property
    def on_gpu(self) -> bool:
        return self.device != CPU


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _from_cai(obj: Any, cai: dict[str, Any]) -> ArrayInfo:
    ptr, readonly = cai["data"]
    shape = tuple(int(x) for x in cai["shape"])
    itemsize = (
        int(np.dtype(cai["typestr"]).itemsize) if cai["typestr"][1:2] != "V" else int(cai["typestr"][2:])
    )
    strides = cai.get("strides")
    strides = _c_strides(shape, itemsize) if strides is None else tuple(int(x) for x in strides)
    device = _device_of_pointer(int(ptr), obj)
    stream = cai.get("stream") if int(cai.get("version", 0)) >= 3 else None
    return ArrayInfo(int(ptr), shape, strides, itemsize, device, bool(readonly), stream, obj)


def _device_of_pointer(ptr: int, obj: Any) -> int:
    device = getattr(obj, "device", None)
    index = getattr(device, "index", None)  # torch.device
    if isinstance(index, int):
        return index
    ident = getattr(device, "id", None)  # cupy.cuda.Device
    if isinstance(ident, int):
        return ident
    import cupy  # a GPU array was passed: CuPy is needed from here on anyway

    if ptr == 0:
        return int(cupy.cuda.runtime.getDevice())
    return int(cupy.cuda.runtime.pointerGetAttributes(ptr).device)


def _from_dlpack(obj: Any, device_type: int, stream: int | None) -> ArrayInfo:
    if device_type in _DEVICE_TYPES and stream is not None:
        # The producer makes ``stream`` wait for its pending work on the array.
        capsule = obj.__dlpack__(stream=stream)
    else:
        capsule = obj.__dlpack__()
    address = _capsule_pointer(capsule, b"dltensor")
    if not address:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "DLPack capsule holds no tensor")
    tensor = _DLTensor.from_address(address)  # DLManagedTensor begins with its DLTensor
    ndim = int(tensor.ndim)
    shape = tuple(int(tensor.shape[i]) for i in range(ndim))
    bits = int(tensor.dtype.bits) * max(1, int(tensor.dtype.lanes))
    if bits % 8:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{bits}-bit elements are not whole bytes")
    itemsize = bits // 8
    if tensor.strides:
        strides = tuple(int(tensor.strides[i]) * itemsize for i in range(ndim))
    else:
        strides = _c_strides(shape, itemsize)
    ptr = int(tensor.data or 0) + int(tensor.byte_offset)
    dev = int(tensor.device.device_id) if device_type in _DEVICE_TYPES else CPU
    # The capsule stays unconsumed: its destructor hands the tensor back to the producer
    # when this description (its owner) goes away.
    return ArrayInfo(ptr, shape, strides, itemsize, dev, False, None, (obj, capsule))


def is_torch_cuda_tensor(obj: Any) -> bool:
    """A PyTorch CUDA tensor, recognised without importing torch."""
    return type(obj).__module__.startswith("torch") and getattr(obj, "is_cuda", False) is True


def _from_torch(tensor: Any) -> ArrayInfo:
    """A torch CUDA tensor's memory from its own accessors: torch's ``__cuda_array_interface__`` is
    Python code that cost ~0.2 ms per put_layer on an H100 host, and refuses bfloat16.

    Its stream is torch's current stream on the tensor's device: the kernels that wrote the
    tensor (or will still read it) are queued there, and the SDK's copies wait for them.
    """
    itemsize = int(tensor.element_size())
    return ArrayInfo(
        int(tensor.data_ptr()),
        tuple(int(x) for x in tensor.shape),
        tuple(int(x) * itemsize for x in tensor.stride()),
        itemsize,
        int(tensor.device.index),
        False,
        _torch_stream(int(tensor.device.index)),
        tensor,
    )


def _torch_stream(device: int) -> int:
    """torch's current stream on ``device``, as a raw pointer.  ``torch.cuda.current_stream`` builds a
    Stream object per call; the accessor beneath it (what torch's own extensions use) does not."""
    import torch  # already imported: only torch tensors come here

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device))
    return int(torch.cuda.current_stream(device).cuda_stream)


def describe_device(obj: Any, stream: int | None = None) -> ArrayInfo | None:
    """The memory of a GPU array (CuPy, torch CUDA tensor, anything with the CUDA array
    interface or a CUDA DLPack device), or None when ``obj`` is not one.

    ``stream``: the CUDA stream the caller will use the memory on; a DLPack producer
    orders it after its own pending writes.
    """
    if is_torch_cuda_tensor(obj):
        return _from_torch(obj)
    cai = None
    try:
        cai = getattr(obj, "__cuda_array_interface__", None)
    except (TypeError, AttributeError, ValueError, RuntimeError):
        cai = None  # e.g. torch refuses bfloat16 here: DLPack below describes it
    if cai is not None:
        return _from_cai(obj, cai)
    dl_device = getattr(obj, "__dlpack_device__", None)
    if dl_device is None or not hasattr(obj, "__dlpack__"):
        return None
    device_type = int(dl_device()[0])
    if device_type not in _DEVICE_TYPES:
        return None
    return _from_dlpack(obj, device_type, stream)


def is_device_array(obj: Any) -> bool:
    """True for GPU arrays, decided from attributes only (imports nothing)."""
    if isinstance(obj, np.ndarray | bytes | bytearray | memoryview):
        return False
    if is_torch_cuda_tensor(obj):
        return True
    try:
        if getattr(obj, "__cuda_array_interface__", None) is not None:
            return True
    except (TypeError, AttributeError, ValueError, RuntimeError):
        return True  # it has the attribute but cannot describe this dtype: a CUDA tensor
    dl_device = getattr(obj, "__dlpack_device__", None)
    if dl_device is None:
        return False
    try:
        return int(dl_device()[0]) in _DEVICE_TYPES
    except (TypeError, ValueError, RuntimeError):
        return False


def describe_host(obj: Any) -> ArrayInfo:
    """The memory of a CPU array: numpy, anything numpy views without a copy, or a DLPack CPU tensor."""
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array_interface__"):
        arr = np.asarray(obj)
    else:
        dl_device = getattr(obj, "__dlpack_device__", None)
        if dl_device is not None and hasattr(obj, "__dlpack__"):
            device_type = int(dl_device()[0])
            if device_type in (_DL_CPU, _DL_CUDA_HOST):
                info = _from_dlpack(obj, device_type, None)
                return ArrayInfo(
                    info.ptr, info.shape, info.strides, info.itemsize, CPU, False, None, info.owner
                )
        try:
            arr = np.asarray(memoryview(obj))
        except TypeError:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"cannot see the memory of a {type(obj).__name__}: pass a numpy array, a tensor "
                "(DLPack) or a CUDA array",
            ) from None
    if arr.dtype.hasobject:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "array holds Python objects, not raw bytes")
    return ArrayInfo(
        int(arr.ctypes.data),
        tuple(arr.shape),
        tuple(arr.strides),
        arr.itemsize,
        CPU,
        not arr.flags.writeable,
        None,
        arr,
    )


def describe(obj: Any, stream: int | None = None) -> ArrayInfo:
    """:func:`describe_device`, else :func:`describe_host`."""
    info = describe_device(obj, stream)
    return info if info is not None else describe_host(obj)


def host_view(info: ArrayInfo) -> np.ndarray:
    """A numpy view of a CPU array's bytes: its shape with the items as a trailing byte axis.

    The view does not keep the memory alive: use it while ``info`` lives.
    """
    if info.on_gpu:
        raise KVStoreError(ErrorCode.INTERNAL, "host_view of a GPU array")
    lowest = sum(min(0, (n - 1) * s) for n, s in zip(info.shape, info.strides, strict=True))
    highest = sum(max(0, (n - 1) * s) for n, s in zip(info.shape, info.strides, strict=True))
    span = highest - lowest + info.itemsize if all(info.shape) else 0
    if span == 0:
        return np.empty((*info.shape, info.itemsize), dtype=np.uint8)
    raw = np.frombuffer(
        memoryview((ctypes.c_char * span).from_address(info.ptr + lowest)).cast("B"), dtype=np.uint8
    )
    return np.lib.stride_tricks.as_strided(
        raw[-lowest:], shape=(*info.shape, info.itemsize), strides=(*info.strides, 1), writeable=True
    )
