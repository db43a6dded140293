"""Page keys, format v1: the published vectors (DESIGN.md "Vectors") and equality across processes."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from kvstore import keys
from kvstore.errors import ErrorCode, KVStoreError

ROOT = "8b8b8e2dd42b4637753e4ca3d6f22959"
ROOT_SALTED = "9e781ac7bb34d161430dde799cde98bf"
PAGE_KEYS = ["a2d21c419dd85677f78d35e804dd958e", "cd8f2953928e21f4c92d8ec83d2cc6b1"]
PAGE_KEYS_CTX = ["a2d21c419dd85677f78d35e804dd958e", "024e98a8218c980797f7120378ffabff"]


def test_root_vectors() -> None:
    assert keys.namespace_root("llama3-8b/bf16").hex() == ROOT
    assert keys.namespace_root("llama3-8b/bf16", b"tenant-a").hex() == ROOT_SALTED


def test_page_key_vectors_skip_the_partial_page() -> None:
    root = keys.namespace_root("llama3-8b/bf16")
    got = keys.page_keys(root, list(range(1, 11)), page_size=4)
    assert [k.hex() for k in got] == PAGE_KEYS  # tokens 9, 10 are a partial page


def test_page_key_vectors_with_context() -> None:
    root = keys.namespace_root("llama3-8b/bf16")
    got = keys.page_keys(root, list(range(1, 9)), page_size=4, contexts=[b"", b"lora:7"])
    assert [k.hex() for k in got] == PAGE_KEYS_CTX


@pytest.mark.parametrize(
    "dtype",
    [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.dtype(">i4")],
)
def test_keys_do_not_depend_on_the_token_dtype(dtype: np.dtype) -> None:
    root = keys.namespace_root("llama3-8b/bf16")
    tokens = np.arange(1, 11).astype(dtype)
    assert [k.hex() for k in keys.page_keys(root, tokens, 4)] == PAGE_KEYS


def test_native_chain_equals_the_formula() -> None:
    """The native chain (pages without context) against DESIGN.md's formula, step by step in Python."""
    import struct

    import xxhash

    root = keys.namespace_root("llama3-8b/bf16")
    tokens = np.random.default_rng(7).integers(0, 2**31, size=300 * 7 + 3)
    expected, parent = [], root
    for page in range(300):
        data = tokens[page * 7 : (page + 1) * 7].astype("<i4").tobytes()
        parent = xxhash.xxh3_128(parent + struct.pack("<I", 0) + data).digest()
        expected.append(parent)
    assert keys.page_keys(root, tokens, 7) == expected
    assert keys.packed_page_keys(root, tokens, 7) == b"".join(expected)
    assert keys.packed_page_keys(root, tokens, 7, [b""] * 300) == b"".join(expected)
    with_ctx = keys.packed_page_keys(root, tokens, 7, [b""] * 299 + [b"lora:7"])
    assert with_ctx[: 299 * 16] == b"".join(expected[:299]) and with_ctx[299 * 16 :] != expected[299]


def test_keys_chain_on_the_parent() -> None:
    root = keys.namespace_root("ns")
    a = keys.page_keys(root, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = keys.page_keys(root, [9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[1] != b[1]  # same second page, different parent
    assert keys.page_keys(keys.namespace_root("other"), [1, 2, 3, 4], 4)[0] != a[0]


@pytest.mark.parametrize(
    "tokens",
    [
        [],
        [[1, 2], [3, 4]],
        [1.0, 2.0],
        [-1, 2],
        [0, 1 << 31],
        np.array([1, 2], dtype=np.float32),
        np.array([3, -1], dtype=np.int8),
        np.array([1 << 32], dtype=np.uint64),  # would wrap to 0 as int32
        np.array([1 << 63], dtype=np.uint64),  # negative as int64
        np.array([7, (1 << 31) + 4], dtype=np.dtype(">i8")),
    ],
)
def test_bad_tokens(tokens: object) -> None:
    with pytest.raises(KVStoreError) as info:
        keys.as_token_array(tokens)
    assert info.value.code is ErrorCode.BAD_TOKENS


@pytest.mark.parametrize(
    ("dtype", "bad_value"),
    [("<i8", -1), ("<u8", 1 << 40), ("<i4", -1), ("<u4", 1 << 31), ("<i2", -1), ("<i1", -1)],
)
@pytest.mark.parametrize("where", [0, 4095, 4096, 10_001, 19_999])
def test_a_bad_token_anywhere_in_a_long_prompt_is_found(dtype: str, bad_value: int, where: int) -> None:
    tokens = np.arange(20_000, dtype=np.int64) % 100
    assert np.array_equal(keys.as_token_array(tokens.astype(dtype)), tokens)
    bad = tokens.astype(dtype)
    bad[where] = bad_value
    with pytest.raises(KVStoreError) as info:
        keys.as_token_array(bad)
    assert info.value.code is ErrorCode.BAD_TOKENS


def test_largest_token_is_accepted() -> None:
    assert keys.as_token_array([0, (1 << 31) - 1]).dtype == np.dtype("<i4")


def test_token_array_is_a_contiguous_copy() -> None:
    tokens = np.arange(20, dtype=np.int32)
    got = keys.as_token_array(tokens[::2])  # strided input
    assert got.flags.c_contiguous and np.array_equal(got, np.arange(0, 20, 2))
    got[0] = 99  # the caller's array is not aliased
    assert tokens[0] == 0


def test_sequence_digest_covers_the_tail() -> None:
    root = keys.namespace_root("ns")
    assert keys.sequence_digest(root, [1, 2, 3, 4, 5]) != keys.sequence_digest(root, [1, 2, 3, 4, 6])
    assert keys.sequence_digest(root, [1, 2, 3, 4]) != keys.sequence_digest(root, [1, 2, 3, 4, 0])


def test_pack_unpack() -> None:
    root = keys.namespace_root("ns")
    ks = keys.page_keys(root, list(range(12)), 4)
    assert keys.unpack_keys(keys.pack_keys(ks)) == ks
    with pytest.raises(KVStoreError) as info:
        keys.unpack_keys(b"x" * 17)
    assert info.value.code is ErrorCode.BAD_KEYS


def _keys_in_child(args: tuple[str, bytes, list[int], int]) -> list[str]:
    name, salt, tokens, page_size = args
    return [k.hex() for k in keys.page_keys(keys.namespace_root(name, salt), tokens, page_size)]


def test_keys_equal_across_processes() -> None:
    tokens = [int(x) for x in np.random.default_rng(7).integers(0, 1 << 31, size=1000)]
    cases = [("llama3-8b/bf16", b"", list(range(1, 11)), 4), ("m/fp8", b"tenant-a", tokens, 16)]
    ctx = multiprocessing.get_context("spawn")  # gRPC and friends do not survive fork
    with ctx.Pool(2) as pool:
        remote = pool.map(_keys_in_child, cases)
    assert remote == [_keys_in_child(c) for c in cases]
    assert remote[0] == PAGE_KEYS


def test_token_sequence_keys_and_digests_equal_the_plain_tokens() -> None:
    root = keys.namespace_root("ns")
    tokens = np.arange(1000, dtype=np.int64) * 7 % 50_000
    seq = keys.TokenSequence(tokens)
    assert len(seq) == 1000 and seq.tokens.dtype == np.dtype("<i4")
    assert keys.page_keys(root, seq, 16) == keys.page_keys(root, tokens, 16)
    for count in (None, 992, 16):
        assert keys.sequence_digest(root, seq, count) == keys.sequence_digest(root, tokens, count)
    assert seq.digest(root, 992) == keys.sequence_digest(root, tokens, 992)  # remembered, still equal
    assert keys.sequence_digest(keys.namespace_root("other"), seq, 992) != seq.digest(root, 992)


def test_token_sequence_is_a_read_only_copy_checked_once() -> None:
    tokens = np.arange(64, dtype=np.int32)
    seq = keys.TokenSequence(tokens)
    tokens[0] = 5  # the caller's array changes later: the sequence does not
    assert seq.tokens[0] == 0 and not seq.tokens.flags.writeable
    assert keys.as_token_array(seq) is seq.tokens  # no second conversion
    with pytest.raises(KVStoreError) as info:
        keys.TokenSequence(np.array([1, -1]))
    assert info.value.code is ErrorCode.BAD_TOKENS
