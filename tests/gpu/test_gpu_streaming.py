"""GPU ``out`` in get_prefix_stream, and the copy-engine (strided copy) path beside the kernel.

Skipped, with the reason, where CuPy or a CUDA device is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="GPU tests need CuPy")

from kvstore.gpu import PagedKV, layouts, transfer  # noqa: E402
from kvstore.testing import prompt  # noqa: E402

PAGE = 16


def _namespace(writer, layers=3, kv_heads=4, head_dim=64):
    return writer.create_namespace(
        page_size=PAGE, num_layers=layers, kind="mha", kv_heads=kv_heads, head_dim=head_dim, dtype="bfloat16"
    )


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_stream_into_gpu_canonical_out(cluster, client, namespace, transport):
    writer = client(cluster, namespace, transport=transport)
    layout = _namespace(writer, layers=4)
    tokens = prompt(61, 7 * PAGE + 3)
    rng = np.random.default_rng(61)
    host = [rng.integers(0, 256, (7, layout.segment_bytes), dtype=np.uint8) for _ in range(4)]
    reader = client(cluster, namespace, transport=transport)
    out = cupy.zeros((4, 7, layout.segment_bytes), dtype=cupy.uint8)
    writer.put_layer(tokens, 0, cupy.asarray(host[0]))  # page 0 open: the stream finds a writer
    with reader.get_prefix_stream(tokens, out=out, wait_ms=10_000) as stream:
        assert stream.num_pages == 7
        futures = [writer.put_layer_async(tokens, layer, cupy.asarray(host[layer])) for layer in (1, 2, 3)]
        seen = []
        for ready in stream:
            assert ready.num_pages == 7
            assert np.array_equal(cupy.asnumpy(ready.data), host[ready.layer])
            seen.append(ready.layer)
        writer.flush()
        assert [f.result() for f in futures] == [7, 7, 7]
    assert sorted(seen) == [0, 1, 2, 3]
    assert np.array_equal(cupy.asnumpy(out), np.stack(host))


def test_stream_gpu_layers_and_heads_subset(cluster, client, namespace):
    writer = client(cluster, namespace)
    layout = _namespace(writer, layers=3)
    tokens = prompt(62, 5 * PAGE)
    rng = np.random.default_rng(62)
    host = [rng.integers(0, 256, (5, layout.segment_bytes), dtype=np.uint8) for _ in range(3)]
    for layer in range(3):
        writer.put_layer(tokens, layer, cupy.asarray(host[layer]))
    reader = client(cluster, namespace)
    heads = (1, 3)
    want = reader.get_prefix(tokens, layers=[2, 0], heads=heads)
    out = cupy.zeros((2, 5, layout.shard_bytes(heads)), dtype=cupy.uint8)
    with reader.get_prefix_stream(tokens, layers=[2, 0], heads=heads, out=out) as stream:
        got = {ready.layer: cupy.asnumpy(ready.data) for ready in stream}
    assert np.array_equal(got[2], want.layer(2)) and np.array_equal(got[0], want.layer(0))
    assert np.array_equal(cupy.asnumpy(out), want.data)


def test_stream_into_gpu_paged_pools(cluster, client, namespace):
    writer = client(cluster, namespace)
    layout = _namespace(writer, layers=2, kv_heads=4, head_dim=64)
    tokens = prompt(63, 6 * PAGE)
    rng = np.random.default_rng(63)
    host = [rng.integers(0, 256, (6, layout.segment_bytes), dtype=np.uint8) for _ in range(2)]
    for layer in range(2):
        writer.put_layer(tokens, layer, cupy.asarray(host[layer]))
    reader = client(cluster, namespace)
    blocks = np.array([4, 9, 0, 7, 2, 5])
    shape = (10, PAGE, 4, 64)
    targets = [cupy.zeros(shape, dtype=cupy.uint16) for _ in range(4)]
    outs = [PagedKV(targets[2 * i], targets[2 * i + 1], block_ids=blocks) for i in range(2)]
    with reader.get_prefix_stream(tokens, out=outs) as stream:
        for ready in stream:
            assert ready.data is outs[ready.index] and ready.num_pages == 6
    for layer in range(2):
        back = PagedKV(
            cupy.asnumpy(targets[2 * layer]), cupy.asnumpy(targets[2 * layer + 1]), block_ids=blocks
        )
        got = layouts.gather_canonical(layouts.resolve(back, layout, (0, 4), 6, "x"))
        assert np.array_equal(got, host[layer])


@pytest.mark.parametrize("max_rects", [0, transfer.MAX_RECT_COPIES])
def test_copy_engine_and_kernel_paths_agree(cluster, client, namespace, monkeypatch, max_rects):
    """Strided copies (consecutive slots) and the kernel (forced: no copies allowed) land the same bytes.

    Two tensor-parallel writers (head ranges: two head runs per shard) and a head-range reader.
    """
    monkeypatch.setattr(transfer, "MAX_RECT_COPIES", max_rects)
    a = client(cluster, namespace)
    layout = _namespace(a, layers=2, kv_heads=4, head_dim=64)
    tokens = prompt(64 + max_rects, 9 * PAGE)
    rng = np.random.default_rng(64)
    full = rng.integers(0, 256, (2, 9, layout.segment_bytes), dtype=np.uint8)
    halves = layout.kv_heads * layout.head_bytes
    for rank in range(2):
        heads = layout.head_range(rank, 2)
        cols = np.concatenate(
            [
                np.arange(
                    h * halves + heads[0] * layout.head_bytes, h * halves + heads[1] * layout.head_bytes
                )
                for h in range(2)
            ]
        )
        for layer in range(2):
            shard = np.ascontiguousarray(full[layer][:, cols])
            assert a.put_layer(tokens, layer, cupy.asarray(shard), tp_rank=rank, tp_size=2) == 9
    cpu = a.get_prefix(tokens)
    assert cpu.num_pages == 9 and np.array_equal(cpu.data, full)
    out = cupy.zeros((2, 9, layout.shard_bytes((1, 3))), dtype=cupy.uint8)
    assert a.get_prefix(tokens, heads=(1, 3), out=out).num_pages == 9
    assert np.array_equal(cupy.asnumpy(out), a.get_prefix(tokens, heads=(1, 3)).data)


def test_slot_rects_follow_runs_of_consecutive_slots():
    """Runs of consecutive slots become one strided copy per layer and head run; fragments fall back."""
    from kvstore.gpu.arrays import ArrayInfo
    from kvstore.layout import Layout
    from kvstore.transports.base import CopyPlan, NodeBatch

    layout = Layout.build("t/r", PAGE, 3, kind="mha", kv_heads=4, head_dim=64, dtype="bfloat16")
    slot = layout.slot_bytes
    info = ArrayInfo(1 << 40, (2 * 6 * layout.segment_bytes,), (1,), 1, 0, False)
    gpu = transfer.GpuPlan(0, None, canonical=info)  # type: ignore[arg-type]
    plan = CopyPlan(layout, [2, 0], (0, 4), np.empty(0, np.uint8), 6, gpu)
    offsets = np.array([10, 11, 12, 40, 41, 7], dtype=np.uint64) * np.uint64(slot)
    batch = NodeBatch(None, None, np.arange(6), offsets, np.zeros(6, np.uint32), slot)  # type: ignore[arg-type]
    rects = transfer.slot_rects(plan, batch, 1 << 30, True)
    assert rects is not None and len(rects) == 2 * 3  # 2 layers x 3 runs of slots (3, 2, 1 pages)
    assert rects[:, 5].tolist() == [3, 2, 1, 3, 2, 1]
    assert rects[0].tolist() == [
        (1 << 30) + 10 * slot + 2 * layout.segment_bytes,
        slot,
        (1 << 40),
        layout.segment_bytes,
        layout.segment_bytes,
        3,
    ]
    assert rects[4, 2] == (1 << 40) + 6 * layout.segment_bytes + 3 * layout.segment_bytes
    many = NodeBatch(None, None, np.arange(6), offsets[::-1].copy(), np.zeros(6, np.uint32), slot)  # type: ignore[arg-type]
    old = transfer.MAX_RECT_COPIES
    try:
        transfer.MAX_RECT_COPIES = 4
        assert transfer.slot_rects(plan, many, 0, False) is None
    finally:
        transfer.MAX_RECT_COPIES = old
