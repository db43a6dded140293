"""PagedKV on the CPU: the reference conversion and the op tables against a plain numpy transpose,
and CPU paged pools through a real cluster (GPU tests: tests/gpu)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvstore import native
from kvstore.errors import KVStoreError
from kvstore.gpu import PagedKV, layouts
from kvstore.layout import Layout
from kvstore.testing import prompt

PAGE = 4


def _layout(kv_heads: int = 4, head_dim: int = 8, dtype: str = "bfloat16", kind: str = "mha") -> Layout:
    return Layout.build("t/x", PAGE, 3, kind=kind, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)


def _pool(rng, blocks, heads, head_dim, np_dtype, layout_kind):
    shape = (
        (blocks, PAGE, heads, head_dim) if layout_kind == "token_major" else (blocks, heads, PAGE, head_dim)
    )
    return rng.integers(0, 2**8, size=shape + (np.dtype(np_dtype).itemsize,), dtype=np.uint8).view(np_dtype)[
        ..., 0
    ]


def _expected(k, v, blocks, head_start, heads, layout_kind):
    """Canonical shards by a plain transpose: [pages, K|V, heads, page, dim] as bytes."""
    halves = []
    for t in (k, v) if v is not None else (k,):
        sel = t[blocks]
        if layout_kind == "token_major":
            sel = sel.transpose(0, 2, 1, 3)
        halves.append(sel[:, head_start : head_start + heads])
    return np.ascontiguousarray(np.stack(halves, axis=1)).view(np.uint8).reshape(len(blocks), -1)


CASES = [
    ("token_major", np.uint16, False, 0, 0),
    ("head_major", np.uint16, False, 0, 0),
    ("token_major", np.float32, True, 0, 0),
    ("token_major", np.uint8, True, 1, 2),
    ("head_major", np.uint8, True, 1, 0),
    ("head_major", np.float32, False, 0, 2),
]


@pytest.mark.parametrize(("kind", "np_dtype", "stacked", "kv_dim", "head_start"), CASES)
def test_reference_and_tables_match_a_transpose(kind, np_dtype, stacked, kv_dim, head_start):
    rng = np.random.default_rng(1)
    item = np.dtype(np_dtype).itemsize
    head_dim = 16 // item  # 16 bytes per head row for every dtype
    dtype = {1: "uint8", 2: "bfloat16", 4: "float32"}[item]
    layout = _layout(kv_heads=4, head_dim=head_dim, dtype=dtype)
    tp_heads = (2, 4)  # tp rank 1 of 2: the pool holds this rank's heads (from head_start)
    pool_heads = 2 + head_start
    k = _pool(rng, 9, pool_heads, head_dim, np_dtype, kind)
    v = _pool(rng, 9, pool_heads, head_dim, np_dtype, kind)
    blocks = np.array([7, 0, 5, 3, 8])  # odd order
    if stacked:
        both = np.stack([k, v], axis=kv_dim)
        paged = PagedKV(
            both, block_ids=blocks, layout=kind, stacked=True, kv_dim=kv_dim, head_start=head_start
        )
    else:
        paged = PagedKV(k, v, block_ids=blocks, layout=kind, head_start=head_start)
    want = _expected(k, v, blocks, head_start, 2, kind)
    geometry = layouts.resolve(paged, layout, tp_heads, len(blocks), "kv")
    assert np.array_equal(layouts.gather_canonical(geometry), want)

    # the GPU op table, run on the CPU: pool -> canonical buffer
    shard = layout.shard_bytes(tp_heads)
    out = np.zeros((len(blocks), shard), dtype=np.uint8)
    base = int(out.ctypes.data) + np.arange(len(blocks), dtype=np.uint64) * np.uint64(shard)
    table = layouts.row_ops(geometry, np.arange(len(blocks)), base, 2 * layout.head_bytes, True)
    native.copy(layouts.expand_rows(table))
    assert np.array_equal(out, want)

    # and back: canonical -> a zeroed pool, compared with the reference scatter
    fresh = [np.zeros_like(k), np.zeros_like(v)]
    if stacked:
        target = PagedKV(
            np.stack(fresh, axis=kv_dim),
            block_ids=blocks,
            layout=kind,
            stacked=True,
            kv_dim=kv_dim,
            head_start=head_start,
        )
    else:
        target = PagedKV(fresh[0], fresh[1], block_ids=blocks, layout=kind, head_start=head_start)
    g2 = layouts.resolve(target, layout, tp_heads, len(blocks), "out")
    table = layouts.row_ops(g2, np.arange(len(blocks)), base, 2 * layout.head_bytes, False)
    native.copy(layouts.expand_rows(table))
    assert np.array_equal(layouts.gather_canonical(g2), want)
    ref = [np.zeros_like(k), np.zeros_like(v)]
    layouts.scatter_canonical(
        layouts.resolve(
            PagedKV(ref[0], ref[1], block_ids=blocks, layout=kind, head_start=head_start),
            layout,
            tp_heads,
            len(blocks),
            "out",
        ),
        want,
    )
    assert np.array_equal(
        layouts.gather_canonical(g2),
        layouts.gather_canonical(
            layouts.resolve(
                PagedKV(ref[0], ref[1], block_ids=blocks, layout=kind, head_start=head_start),
                layout,
                tp_heads,
                len(blocks),
                "x",
            )
        ),
    )


def test_slot_side_table_addresses_heads_in_the_segment():
    """Against slots, a partial head range lands at its heads of each half (segment layout)."""
    layout = _layout(kv_heads=4, head_dim=8)
    rng = np.random.default_rng(2)
    k = _pool(rng, 3, 2, 8, np.uint16, "token_major")
    v = _pool(rng, 3, 2, 8, np.uint16, "token_major")
    paged = PagedKV(k, v, block_ids=[2, 1], layout="token_major")
    geometry = layouts.resolve(paged, layout, (2, 4), 2, "kv")
    slots = np.zeros((2, layout.slot_bytes), dtype=np.uint8)
    seg_off = layout.segment_offset(1)
    base = (
        int(slots.ctypes.data)
        + np.arange(2, dtype=np.uint64) * np.uint64(layout.slot_bytes)
        + np.uint64(seg_off + 2 * layout.head_bytes)
    )
    native.copy(
        layouts.expand_rows(layouts.row_ops(geometry, np.arange(2), base, 4 * layout.head_bytes, True))
    )
    want = _expected(k, v, np.array([2, 1]), 0, 2, "token_major").reshape(2, 2, -1)
    runs = layout.shard_runs((2, 4))
    for half, (in_seg, _, length) in enumerate(runs):
        got = slots[:, seg_off + in_seg : seg_off + in_seg + length]
        assert np.array_equal(got, want[:, half])


def test_mla_latent_without_head_axis():
    layout = _layout(kv_heads=1, head_dim=8, kind="mla")
    rng = np.random.default_rng(3)
    latent = rng.integers(0, 255, (5, PAGE, 16), dtype=np.uint8)
    geometry = layouts.resolve(PagedKV(latent, block_ids=[4, 2]), layout, (0, 1), 2, "kv")
    assert np.array_equal(layouts.gather_canonical(geometry), latent[[4, 2]].reshape(2, -1))


def test_bad_pools_are_refused_with_reasons():
    layout = _layout()
    k = np.zeros((4, PAGE * 2, 4, 8), dtype=np.uint16)
    with pytest.raises(KVStoreError, match="block_size 8 != page_size 4"):
        layouts.resolve(PagedKV(k, k, block_ids=[0]), layout, (0, 4), 1, "kv")
    k = np.zeros((4, PAGE, 4, 8), dtype=np.uint16)
    with pytest.raises(KVStoreError, match="block ids outside"):
        layouts.resolve(PagedKV(k, k, block_ids=[4]), layout, (0, 4), 1, "kv")
    with pytest.raises(KVStoreError, match="2 block ids for 3"):
        layouts.resolve(PagedKV(k, k, block_ids=[0, 1]), layout, (0, 4), 3, "kv")
    with pytest.raises(KVStoreError, match="needs v"):
        layouts.resolve(PagedKV(k, block_ids=[0]), layout, (0, 4), 1, "kv")
    with pytest.raises(KVStoreError, match="pool holds 4 heads"):
        layouts.resolve(PagedKV(k, k, block_ids=[0], head_start=1), layout, (0, 4), 1, "kv")


def test_torch_cpu_bfloat16_through_dlpack():
    torch = pytest.importorskip("torch")
    layout = _layout()
    k = torch.randn(6, PAGE, 4, 8, dtype=torch.bfloat16)
    v = torch.randn(6, PAGE, 4, 8, dtype=torch.bfloat16)
    blocks = [5, 1, 3]
    geometry = layouts.resolve(PagedKV(k, v, block_ids=blocks), layout, (0, 4), 3, "kv")
    want = torch.stack([k[blocks].transpose(1, 2), v[blocks].transpose(1, 2)], dim=1).contiguous()
    assert np.array_equal(
        layouts.gather_canonical(geometry), want.view(torch.int16).numpy().view(np.uint8).reshape(3, -1)
    )


def test_importing_the_client_imports_neither_cupy_nor_torch():
    code = "import sys, kvstore, kvstore.client, kvstore.gpu; print(sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _token_major_pool(seed: int, blocks: int, heads: int = 4, head_dim: int = 8):
    rng = np.random.default_rng(seed)
    return _pool(rng, blocks, heads, head_dim, np.uint16, "token_major"), _pool(
        rng, blocks, heads, head_dim, np.uint16, "token_major"
    )


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_cpu_paged_pool_through_a_cluster(cluster, client, namespace, transport):
    writer = client(cluster, namespace, transport=transport)
    layout = writer.create_namespace(
        page_size=PAGE, num_layers=2, kind="mha", kv_heads=4, head_dim=8, dtype="bfloat16"
    )
    tokens = prompt(11, 5 * PAGE + 1)
    pools = [_token_major_pool(layer, 8) for layer in range(2)]
    blocks = np.array([6, 2, 7, 0, 4, 1])  # one more than the full pages: engines' partial block
    for layer, (k, v) in enumerate(pools):
        assert writer.put_layer(tokens, layer, PagedKV(k, v, block_ids=blocks)) == 5
    reader = client(cluster, namespace, transport=transport)
    hit = reader.get_prefix(tokens)
    assert hit.num_pages == 5
    for layer, (k, v) in enumerate(pools):
        assert np.array_equal(hit.layer(layer), _expected(k, v, blocks[:5], 0, 4, "token_major"))
    # read into a head-major pool with other blocks, one PagedKV per layer
    targets = [np.zeros((10, 2, 4, PAGE, 8), dtype=np.uint16) for _ in range(2)]
    out_blocks = np.array([9, 3, 5, 0, 8])
    outs = [PagedKV(t, block_ids=out_blocks, layout="head_major", stacked=True, kv_dim=1) for t in targets]
    hit = reader.get_prefix(tokens, out=outs)
    assert hit.num_pages == 5
    for layer, (k, v) in enumerate(pools):
        got = targets[layer][out_blocks]  # [pages, 2, heads, page, dim]
        want = _expected(k, v, blocks[:5], 0, 4, "token_major")
        assert np.array_equal(np.ascontiguousarray(got).view(np.uint8).reshape(5, -1), want)
    assert layout.shard_bytes((0, 4)) == 2 * 4 * PAGE * 8 * 2
