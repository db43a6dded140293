"""Page keys, format v1 (DESIGN.md, "Page key"): the only place the hash chain lives.

    root   = xxh3_128(b"kvstore/v1\\0" + u32le(len(name)) + name + u32le(len(salt)) + salt)
    key[i] = xxh3_128(key[i-1] + u32le(len(ctx_i)) + ctx_i + tokens of page i as int32 le)

Only full pages get keys.  Tokens outside [0, 2^31) are rejected.  Pages without a context
are chained by the native engine (``key_chain`` in native/copyengine.c, the same formula);
tests/unit/test_keys.py checks it against the vectors and the formula step by step.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

from kvstore import _native
from kvstore.errors import ErrorCode, KVStoreError

KEY_BYTES = 16
TOKEN_LIMIT = 1 << 31
_DOMAIN = b"kvstore/v1\0"
_U32 = struct.Struct("<I")


def namespace_root(name: str, salt: bytes = b"") -> bytes:
    """The chain's root: the parent key of page 0."""
    encoded = name.encode("utf-8")
    return xxhash.xxh3_128(_DOMAIN + _U32.pack(len(encoded)) + encoded + _U32.pack(len(salt)) + salt).digest()


class TokenSequence:
    """A prompt's tokens fixed once: checked and converted to int32 once, digests remembered.

    Accepted wherever a call takes ``tokens`` (put_layer, put_layer_async, get_prefix, ...).
    An engine that writes every layer of a request passes one per request: its put calls then
    neither convert nor hash the prompt again (a 262144-token prompt cost ~0.45 ms per
    put_layer on an H100 host).  The tokens are copied: changing the caller's array later does
    not change the sequence.
    """

    __slots__ = ("_digests", "tokens")

    def __init__(self, tokens: Any) -> None:
        arr = as_token_array(tokens)
        arr.flags.writeable = False
        self.tokens = arr
        # a plain dict: threads that race on a missing digest work out the same value
        self._digests: dict[tuple[bytes, int], bytes] = {}

    def __len__(self) -> int:
        return int(self.tokens.size)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if dtype is not None and np.dtype(dtype) != self.tokens.dtype:
            return self.tokens.astype(dtype)
        return self.tokens.copy() if copy else self.tokens

    def __repr__(self) -> str:
        return f"TokenSequence({self.tokens.size} tokens)"

    def digest(self, root: bytes, count: int) -> bytes:
        """:func:`sequence_digest` of the first ``count`` tokens, worked out once per (root, count)."""
        known = self._digests.get((root, count))
        if known is None:
            known = self._digests[(root, count)] = _digest(root, self.tokens, count)
        return known


def token_source(tokens: Any) -> np.ndarray:
    """Tokens as a one-dimensional, contiguous, native-endian integer array: shape and dtype checked,
    values not yet (:func:`as_token_array` and :func:`sequence_digest` check them in their pass)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise KVStoreError(ErrorCode.BAD_TOKENS, f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise KVStoreError(ErrorCode.BAD_TOKENS, "tokens are empty")
    if arr.dtype.kind not in "iu":
        raise KVStoreError(ErrorCode.BAD_TOKENS, f"tokens must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("=")))


def _out_of_range() -> KVStoreError:
    return KVStoreError(ErrorCode.BAD_TOKENS, "tokens must lie in [0, 2^31)")


def as_token_array(tokens: Any) -> np.ndarray:
    """Validate tokens and return them as a contiguous little-endian int32 array."""
    # One native pass converts and checks (a prompt of 256K int64 tokens: ~0.1 ms instead of
    # min, max and a conversion, ~0.6 ms).
    if isinstance(tokens, TokenSequence):
        return tokens.tokens
    src = token_source(tokens)
    out = np.empty(src.size, dtype="<i4")
    if _native.tokens_i32(src, src.dtype.itemsize, src.dtype.kind == "i", out) >= 0:
        raise _out_of_range()
    return out


def page_keys(
    root: bytes,
    tokens: Any,
    page_size: int,
    contexts: Sequence[bytes] | None = None,
) -> list[bytes]:
    """Keys of every full page of ``tokens``; ``contexts[i]`` is page i's optional context."""
    if page_size <= 0:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "page_size must be positive")
    arr = as_token_array(tokens)
    num_pages = arr.size // page_size
    if contexts is not None and len(contexts) < num_pages:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{len(contexts)} page contexts for {num_pages} pages")
    if contexts is None or not any(contexts[:num_pages]):
        # No page context: the whole chain in one native call (a Python step per page costs
        # ~0.2 us each, 0.4 ms for a 2048-page put).
        packed = bytearray(num_pages * KEY_BYTES)
        _native.key_chain(root, arr.data.cast("B"), page_size, packed)
        return unpack_keys(bytes(packed))
    raw = arr.tobytes()
    stride = page_size * 4
    keys: list[bytes] = []
    parent = root
    empty_ctx = _U32.pack(0)
    for i in range(num_pages):
        ctx = contexts[i] if contexts is not None else b""
        prefix = _U32.pack(len(ctx)) + ctx if ctx else empty_ctx
        parent = xxhash.xxh3_128(parent + prefix + raw[i * stride : (i + 1) * stride]).digest()
        keys.append(parent)
    return keys


def packed_page_keys(
    root: bytes, tokens: Any, page_size: int, contexts: Sequence[bytes] | None = None
) -> bytes:
    """:func:`page_keys`, packed (16 bytes each): without page contexts, no Python object per page."""
    if page_size <= 0:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "page_size must be positive")
    arr = as_token_array(tokens)
    if contexts is not None and (any(contexts) or len(contexts) < arr.size // page_size):
        return pack_keys(page_keys(root, arr, page_size, contexts))  # checks and hashes the contexts
    packed = bytearray((arr.size // page_size) * KEY_BYTES)
    _native.key_chain(root, arr.data.cast("B"), page_size, packed)
    return bytes(packed)


def pack_keys(keys: Sequence[bytes]) -> bytes:
    return b"".join(keys)


def unpack_keys(packed: bytes) -> list[bytes]:
    if len(packed) % KEY_BYTES:
        raise KVStoreError(
            ErrorCode.BAD_KEYS, f"{len(packed)} bytes of keys is not a multiple of {KEY_BYTES}"
        )
    return [packed[i : i + KEY_BYTES] for i in range(0, len(packed), KEY_BYTES)]


def sequence_digest(root: bytes, tokens: Any, count: int | None = None) -> bytes:
    """Digest of the first ``count`` tokens of a sequence (all of them by default): the key of a
    sequence's extras, and (of its full pages) of a client's put session.

    Every token is checked, the ones past ``count`` as well.  One native pass: the tokens are
    converted to int32 block by block into the hash, with no copy of the prompt (a put_layer call
    of a 262144-token prompt spent ~0.9 ms converting and hashing on an H100 host).
    """
    if isinstance(tokens, TokenSequence):
        return tokens.digest(root, len(tokens) if count is None else count)
    src = token_source(tokens)
    return _digest(root, src, src.size if count is None else count)


def _digest(root: bytes, src: np.ndarray, count: int) -> bytes:
    bad, digest = _native.tokens_digest(
        root + b"seq" + _U32.pack(count), src, src.dtype.itemsize, src.dtype.kind == "i", count
    )
    if bad >= 0:
        raise _out_of_range()
    return digest
