"""Decoding the packed little-endian arrays of the control plane (proto/kvstore.proto).

Bulk per-page fields travel as packed byte strings; every service decodes them
here, so a malformed length is the same INVALID_ARGUMENT everywhere.
"""

from __future__ import annotations

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError


def unpack(raw: bytes, dtype: str, what: str, width: int = 1) -> np.ndarray:
    """``raw`` as an array of ``dtype`` (``width`` values per row); INVALID_ARGUMENT unless it is whole rows."""
    row = np.dtype(dtype).itemsize * width
    if len(raw) % row:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT, f"{what}: {len(raw)} bytes is not a whole number of {row}-byte rows"
        )
    table = np.frombuffer(raw, dtype=dtype)
    return table.reshape(-1, width) if width > 1 else table
