"""The batched copy engine (native/copyengine.c), with numpy-friendly wrappers.

One call moves or hashes a whole table of ranges with the GIL released; never
call it once per segment.
"""

from __future__ import annotations

import socket

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


def _timeout_ms(sock: socket.socket) -> int:
    timeout = sock.gettimeout()
    return -1 if timeout is None else max(0, int(timeout * 1000))


def send_ranges(sock: socket.socket, ranges: np.ndarray, with_hashes: bool = False) -> np.ndarray | None:
    """Send each (addr, len) row, back to back; with ``with_hashes``, return xxh3_64 of each range.

    The hashes are computed on each group of bytes just before it is sent (in cache).
    """
    table = _table(ranges, 2)
    hashes = np.empty(len(table), dtype=np.uint64) if with_hashes else None
    _native.send(sock.fileno(), table, hashes, _timeout_ms(sock))
    return hashes


def recv_ranges(
    sock: socket.socket, ranges: np.ndarray, with_hashes: bool = False, staging: np.ndarray | None = None
) -> np.ndarray | None:
    """Fill each (addr, len) row from the socket, in order; with ``with_hashes``, return xxh3_64 of each.

    The hashes are computed on each group of bytes right after it lands (in cache).  With
    ``staging`` (a small writable buffer, see :func:`staging_buffer`) each system call lands
    there and its bytes are hashed and stream-copied into the ranges: the ranges' memory is
    only written, never read first, which is cheaper when it is cold (a pool, a KV buffer).
    ConnectionError if the peer closes first; TimeoutError after the socket's timeout.
    """
    table = _table(ranges, 2)
    hashes = np.empty(len(table), dtype=np.uint64) if with_hashes else None
    _native.recv(sock.fileno(), table, hashes, _timeout_ms(sock), staging)
    return hashes


STAGING_BYTES = 256 << 10  # one system call's bytes: small enough to stay in L2 while hashed and copied out


def staging_buffer() -> np.ndarray:
    """A buffer for :func:`recv_ranges`' ``staging``; one per thread (a receive writes into it)."""
    return np.empty(STAGING_BYTES, dtype=np.uint8)


def address_of(array: np.ndarray) -> int:
    return int(array.ctypes.data)


def first_moved(table: np.ndarray, units: np.ndarray, expected: np.ndarray) -> int:
    """The first i where ``table[units[i]] != expected[i]`` (u32 generations; an index outside the
    table counts as moved), or -1 when none moved."""
    return _native.first_moved(
        np.ascontiguousarray(table, dtype=np.uint32),
        np.ascontiguousarray(units, dtype=np.int64),
        np.ascontiguousarray(expected, dtype=np.uint32),
    )
