"""The batched copy engine (native/copyengine.c), with numpy-friendly wrappers.

One call moves or hashes a whole table of ranges with the GIL released; never
call it once per segment.
"""

from __future__ import annotations

import numpy as np

from kvstore import _native


def _table(ops: np.ndarray, width: int) -> np.ndarray:
    table = np.ascontiguousarray(ops, dtype=np.uint64)
    if table.ndim != 2 or table.shape[1] != width:
        raise ValueError(f"op table must have shape [n, {width}], got {table.shape}")
    return table


def copy(ops: np.ndarray, with_hashes: bool = False, threads: int = 1) -> np.ndarray | None:
    """Copy each (dst, src, len) row; with ``with_hashes``, return xxh3_64 of each copied range."""
    table = _table(ops, 3)
    if not with_hashes:
        _native.copy(table, None, threads)
        return None
    hashes = np.empty(len(table), dtype=np.uint64)
    _native.copy(table, hashes, threads)
    return hashes


def hash_ranges(ops: np.ndarray, threads: int = 1) -> np.ndarray:
    """xxh3_64 of each (addr, len) row."""
    table = _table(ops, 2)
    hashes = np.empty(len(table), dtype=np.uint64)
    _native.hash(table, hashes, threads)
    return hashes


def fill(ops: np.ndarray, byte: int = 0) -> None:
    """memset each (addr, len) row."""
    _native.fill(_table(ops, 2), byte)


def address_of(array: np.ndarray) -> int:
    return int(array.ctypes.data)
