"""Caller buffers as flat byte views, checked before any RPC.

Accepted: any C-contiguous numpy array (any dtype), anything with the buffer
protocol (bytes, bytearray, memoryview, mmap), or an object numpy can view
without copying (``__array_interface__``, e.g. a CPU tensor).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError


def byte_view(obj: Any, what: str, writable: bool = False) -> np.ndarray:
    """A flat uint8 view of ``obj``'s memory (never a copy)."""
    arr: np.ndarray
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            view = memoryview(obj)
        except TypeError:
            view = None
        if view is not None:
            if not view.c_contiguous:
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what} must be C-contiguous")
            arr = np.frombuffer(view, dtype=np.uint8) if view.nbytes else np.empty(0, dtype=np.uint8)
            if view.readonly and arr.flags.writeable:  # frombuffer of some exporters loses read-only-ness
                arr.flags.writeable = False
        elif hasattr(obj, "__array_interface__") or (not writable and hasattr(obj, "__array__")):
            # __array_interface__ describes the object's own memory; a bare __array__ may hand back
            # a copy, which is fine to read from but would swallow what we write.
            arr = np.asarray(obj)
        else:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what} must be a numpy array or a bytes-like object, not {type(obj).__name__}",
            )
    if not arr.flags.c_contiguous:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what} must be C-contiguous")
    if writable and not arr.flags.writeable:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what} must be writable")
    if arr.dtype.hasobject:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what} holds Python objects, not raw bytes")
    return arr.reshape(-1).view(np.uint8)


def check_size(view: np.ndarray, expected: int, what: str, shape: str) -> None:
    if view.size != expected:
        raise KVStoreError(
            ErrorCode.BAD_SIZE, f"{what} holds {view.size} bytes; expected {expected} ({shape})"
        )
