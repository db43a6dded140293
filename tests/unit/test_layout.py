"""Namespace layout math: sizes, head ranges, shard runs, copy tables and shard checksums."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from kvstore import native
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.layout import SLOT_ALIGN, Layout, copy_table, shard_checksums


def mha(kv_heads: int = 8, head_dim: int = 4, page_size: int = 4, layers: int = 3) -> Layout:
    return Layout.build(
        "t/mha", page_size, layers, kind="mha", kv_heads=kv_heads, head_dim=head_dim, dtype="float16"
    )


def test_geometry_sizes() -> None:
    lay = mha()
    assert lay.segment_bytes == 2 * 8 * 4 * 4 * 2
    assert lay.head_bytes == 4 * 4 * 2
    assert lay.page_bytes == 3 * lay.segment_bytes
    assert lay.slot_bytes % SLOT_ALIGN == 0 and lay.slot_bytes >= lay.page_bytes
    mla = Layout.build("t/mla", 16, 2, kind="mla", head_dim=576, dtype="bfloat16")
    assert mla.kv_heads == 1 and mla.segment_bytes == 16 * 576 * 2 and mla.replicated


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(page_size=0, num_layers=1, segment_bytes=64),
        dict(page_size=4, num_layers=0, segment_bytes=64),
        dict(page_size=4, num_layers=1, segment_bytes=0),
        dict(page_size=4, num_layers=1, kind="gqa", kv_heads=1, head_dim=1, dtype="float16"),
        dict(page_size=4, num_layers=1, kind="mha", kv_heads=1, head_dim=1, dtype="float64"),
        dict(page_size=4, num_layers=1, kind="mla", kv_heads=2, head_dim=1, dtype="float16"),
        dict(page_size=4, num_layers=1, segment_bytes=7, kind="mha", kv_heads=1, head_dim=1, dtype="float16"),
    ],
)
def test_bad_definitions(kwargs: dict) -> None:
    with pytest.raises(KVStoreError) as info:
        Layout.build("t/bad", **kwargs)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_head_ranges() -> None:
    lay = mha(kv_heads=8)
    assert [lay.head_range(r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert lay.head_range(0, 1) == (0, 8)
    for bad in [(4, 4), (-1, 4), (0, 3), (0, 0)]:
        with pytest.raises(KVStoreError) as info:
            lay.head_range(*bad)
        assert info.value.code is ErrorCode.BAD_RANGE
    opaque = Layout.build("t/o", 4, 2, segment_bytes=100)
    assert opaque.head_range(3, 4) == (0, 1)  # replicated: every rank names the whole segment


def test_check_heads_and_layers() -> None:
    lay = mha(kv_heads=8, layers=3)
    assert lay.check_heads(None) == (0, 8)
    assert lay.check_heads((2, 5)) == (2, 5)
    for bad in [(5, 5), (0, 9), (-1, 2)]:
        with pytest.raises(KVStoreError):
            lay.check_heads(bad)
    assert Layout.build("t/o", 4, 2, segment_bytes=100).check_heads((0, 1)) == (0, 1)
    mla = Layout.build("t/mla", 4, 2, kind="mla", head_dim=8, dtype="int8")
    with pytest.raises(KVStoreError):
        mla.check_heads((0, 0))
    assert lay.check_layers(None) == [0, 1, 2]
    assert lay.check_layers(range(1, 3)) == [1, 2]
    for bad_layers in [[], [3], [-1]]:
        with pytest.raises(KVStoreError) as info:
            lay.check_layers(bad_layers)
        assert info.value.code is ErrorCode.BAD_RANGE


def test_shard_runs() -> None:
    lay = mha(kv_heads=8, head_dim=4, page_size=4)
    hb = lay.head_bytes
    assert lay.shard_runs((0, 8)) == [(0, 0, lay.segment_bytes)]
    # heads 2..5: one run in K, one in V; the shard is [K heads 2..5][V heads 2..5]
    assert lay.shard_runs((2, 5)) == [(2 * hb, 0, 3 * hb), (8 * hb + 2 * hb, 3 * hb, 3 * hb)]
    assert lay.shard_bytes((2, 5)) == 6 * hb


def reference_shard(segment: np.ndarray, lay: Layout, heads: tuple[int, int]) -> np.ndarray:
    """The canonical head-major shard by plain numpy slicing: [half][heads][page][dim]."""
    view = segment.reshape(lay.halves, lay.kv_heads, lay.head_bytes)
    return view[:, heads[0] : heads[1]].reshape(-1)


@pytest.mark.parametrize("heads", [(0, 8), (2, 4), (6, 8)])
def test_copy_table_moves_the_right_bytes(heads: tuple[int, int]) -> None:
    lay = mha(kv_heads=8, head_dim=4, page_size=4, layers=3)
    rng = np.random.default_rng(1)
    num_slots = 5
    slots = rng.integers(0, 256, size=num_slots * lay.slot_bytes, dtype=np.uint8)
    pages = np.array([3, 0, 4])  # slot index of buffer page p
    layers = [2, 0]
    shard = lay.shard_bytes(heads)
    buf = np.zeros(len(layers) * len(pages) * shard, dtype=np.uint8)
    slot_addrs = slots.ctypes.data + pages * lay.slot_bytes
    table = copy_table(slot_addrs, buf.ctypes.data, lay, layers, heads, False, shard, len(pages) * shard)
    hashes = native.copy(table, with_hashes=True)
    got = buf.reshape(len(layers), len(pages), shard)
    for li, layer in enumerate(layers):
        for p, slot in enumerate(pages):
            seg_start = slot * lay.slot_bytes + layer * lay.segment_bytes
            want = reference_shard(slots[seg_start : seg_start + lay.segment_bytes], lay, heads)
            np.testing.assert_array_equal(got[li, p], want)
    # checksums: one per (layer, page) shard, combining the per-run hashes
    sums = shard_checksums(hashes, len(lay.shard_runs(heads))).reshape(len(layers), len(pages))
    if heads == (0, 8):
        assert int(sums[1, 2]) == xxhash.xxh3_64_intdigest(got[1, 2].tobytes())
    # and back: write the buffer into fresh slots, the same bytes land in the same places
    fresh = np.zeros_like(slots)
    back = copy_table(
        fresh.ctypes.data + pages * lay.slot_bytes,
        buf.ctypes.data,
        lay,
        layers,
        heads,
        True,
        shard,
        len(pages) * shard,
    )
    write_hashes = native.copy(back, with_hashes=True)
    np.testing.assert_array_equal(write_hashes, hashes)  # same bytes, same run hashes
    mask = np.zeros_like(slots, dtype=bool)
    for row in back:
        start = int(row[0]) - fresh.ctypes.data
        mask[start : start + int(row[2])] = True
    np.testing.assert_array_equal(fresh[mask], slots[mask])
    assert not fresh[~mask].any()


def test_shard_checksums_combination() -> None:
    runs = np.array([11, 22, 33, 44], dtype=np.uint64)
    assert shard_checksums(runs, 1).tolist() == [11, 22, 33, 44]
    mix = 0x9E3779B97F4A7C15
    combined = shard_checksums(runs, 2).tolist()
    assert combined == [((11 * mix) % (1 << 64)) ^ 22, ((33 * mix) % (1 << 64)) ^ 44]


@pytest.mark.parametrize("threads", [1, 2])
def test_native_one_pass_hashed_copy_matches_xxhash_at_every_tail(threads: int) -> None:
    """The one-pass copy (4 KiB and up into a 16-byte aligned destination, XXH3's stripes
    accumulated as they are stored): every tail length after the last whole stripe, lengths on
    and around XXH3's 1 KiB blocks, sources at odd offsets."""
    rng = np.random.default_rng(11)
    base = 64 << 10
    lengths = [4096 + k for k in (0, 1, 63, 64, 65, 1023, 1024, 1025)] + [16 << 10, (32 << 10) + 5]
    lengths += [base + k for k in range(0, 130)] + [
        base + 1024 * j + k for j in (1, 7) for k in (-65, -64, -1, 1, 63)
    ]
    lengths += [(1 << 20) + 4097, 3 * base + 555]
    src = rng.integers(0, 256, sum(lengths) + 64 * len(lengths), dtype=np.uint8)
    dst = np.zeros(sum(lengths) + 64 * len(lengths) + 64, dtype=np.uint8)
    d0 = (-dst.ctypes.data) % 64
    ops, s, d = [], 1, d0
    for n in lengths:
        ops.append((dst.ctypes.data + d, src.ctypes.data + s, n))
        s, d = s + n + 3, d + ((n + 63) // 64) * 64 + 16  # destinations 16-byte aligned, sources not
    hashes = native.copy(np.array(ops, dtype=np.uint64), with_hashes=True, threads=threads)
    assert hashes is not None
    for (dst_addr, src_addr, n), got in zip(ops, hashes.tolist(), strict=True):
        want = src[src_addr - src.ctypes.data : src_addr - src.ctypes.data + n]
        assert np.array_equal(dst[dst_addr - dst.ctypes.data : dst_addr - dst.ctypes.data + n], want), n
        assert got == xxhash.xxh3_64_intdigest(want.tobytes()), n


@pytest.mark.parametrize("threads", [1, 2])
def test_native_copy_hashes_exactly_the_bytes_it_copies(threads: int) -> None:
    """Hashed copies of every size class (short, just under and over the staged path's 64 KiB, long,
    odd lengths, unaligned ends) land byte for byte and hash like xxhash."""
    rng = np.random.default_rng(9)
    lengths = [0, 1, 240, 4095, (64 << 10) - 1, 64 << 10, (64 << 10) + 7, 100_003, 16 << 10, (1 << 20) + 33]
    src = rng.integers(0, 256, sum(lengths) + 64, dtype=np.uint8)
    dst = np.zeros(sum(lengths) + 256, dtype=np.uint8)
    ops, s, d = [], 3, 5  # odd offsets: neither side aligned
    for n in lengths:
        ops.append((dst.ctypes.data + d, src.ctypes.data + s, n))
        s, d = s + n, d + n + 9
    hashes = native.copy(np.array(ops, dtype=np.uint64), with_hashes=True, threads=threads)
    assert hashes is not None
    for (dst_addr, src_addr, n), got in zip(ops, hashes.tolist(), strict=True):
        want = src[src_addr - src.ctypes.data : src_addr - src.ctypes.data + n]
        landed = dst[dst_addr - dst.ctypes.data : dst_addr - dst.ctypes.data + n]
        assert np.array_equal(landed, want)
        assert got == xxhash.xxh3_64_intdigest(want.tobytes())
