"""The GPU data plane on a real device: kernels against plain copies, and GPU puts/gets through a cluster.

Every test is skipped (with the reason) where CuPy or a CUDA device is absent.
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="GPU tests need CuPy")

from kvstore import native  # noqa: E402
from kvstore.gpu import PagedKV, layouts, transfer  # noqa: E402
from kvstore.gpu.engine import engine_for, split_long  # noqa: E402
from kvstore.layout import Layout  # noqa: E402
from kvstore.testing import committed_checksums, prompt, row_hashes, wait_for  # noqa: E402

PAGE = 16


def _emulate(table: np.ndarray, dst: np.ndarray, src: np.ndarray, dst_base: int, src_base: int) -> None:
    for d, s, n in table.tolist():
        dst[d - dst_base : d - dst_base + n] = src[s - src_base : s - src_base + n]


@pytest.mark.parametrize("aligned", [True, False])
def test_segment_kernel_matches_plain_copies(aligned):
    rng = np.random.default_rng(0)
    size = 4 << 20
    src_host = rng.integers(0, 256, size, dtype=np.uint8)
    src = cupy.asarray(src_host)
    dst = cupy.zeros(size, dtype=cupy.uint8)
    n = 200
    lengths = rng.integers(1, 9000, n).astype(np.uint64)
    if aligned:
        lengths = (lengths + 15) // 16 * 16
    lengths[0] = (3 << 19) + (0 if aligned else 7)  # longer than SPLIT_BYTES: cut into pieces
    assert int(lengths.sum()) + 3 <= size
    src_off = np.cumsum(lengths) - lengths + np.uint64(0 if aligned else 3)
    order = rng.permutation(n)  # scatter in odd order
    dst_off = np.empty(n, dtype=np.uint64)
    dst_off[order] = np.cumsum(lengths[order]) - lengths[order]
    table = np.stack([dst_off + np.uint64(dst.data.ptr), src_off + np.uint64(src.data.ptr), lengths], axis=1)
    engine = engine_for(0)
    with engine:
        engine.copy_segments(table)
        engine.sync()
    want = np.zeros(size, dtype=np.uint8)
    _emulate(table, want, src_host, dst.data.ptr, src.data.ptr)
    assert np.array_equal(cupy.asnumpy(dst), want)
    assert len(split_long(table)) > len(table)


def _pool(shape, np_dtype, seed):
    rng = np.random.default_rng(seed)
    item = np.dtype(np_dtype).itemsize
    raw = rng.integers(0, 256, (*shape, item), dtype=np.uint8)
    return np.ascontiguousarray(raw).view(np_dtype)[..., 0]


CASES = [
    ("token_major", np.uint16, False, 0, 8, (0, 8), 0),  # bf16/fp16 as raw bytes, whole range
    ("token_major", np.uint16, True, 0, 4, (4, 8), 0),  # vLLM-style stacked, TP rank 1 of 2
    ("head_major", np.float32, False, 0, 8, (2, 4), 2),  # pool of more heads, a sub-range
    ("head_major", np.uint8, True, 1, 8, (0, 8), 0),  # fp8 as bytes, FlashInfer-style stacked
    ("token_major", np.uint8, False, 0, 3, (0, 3), 0),  # odd head count, unaligned rows
]


@pytest.mark.parametrize(
    ("kind", "np_dtype", "stacked", "kv_dim", "pool_heads", "heads", "head_start"), CASES
)
def test_row_kernel_converts_paged_pools(kind, np_dtype, stacked, kv_dim, pool_heads, heads, head_start):
    item = np.dtype(np_dtype).itemsize
    head_dim = 120 // item if pool_heads == 3 else 128 // item
    dtype = {1: "uint8", 2: "bfloat16", 4: "float32"}[item]
    kv_heads = 8 if pool_heads != 3 else 3
    layout = Layout.build("t/g", PAGE, 2, kind="mha", kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    blocks = np.array([11, 2, 7, 0, 5, 9, 3])
    shape = (13, PAGE, pool_heads, head_dim) if kind == "token_major" else (13, pool_heads, PAGE, head_dim)
    k_host, v_host = _pool(shape, np_dtype, 1), _pool(shape, np_dtype, 2)
    if stacked:
        both = cupy.asarray(np.stack([k_host, v_host], axis=kv_dim))
        gpu_paged = PagedKV(
            both, block_ids=blocks, layout=kind, stacked=True, kv_dim=kv_dim, head_start=head_start
        )
    else:
        gpu_paged = PagedKV(
            cupy.asarray(k_host), cupy.asarray(v_host), block_ids=blocks, layout=kind, head_start=head_start
        )
    cpu_paged = PagedKV(k_host, v_host, block_ids=blocks, layout=kind, head_start=head_start)
    want = layouts.gather_canonical(layouts.resolve(cpu_paged, layout, heads, len(blocks), "cpu"))

    engine = engine_for(0)
    geometry = layouts.resolve(gpu_paged, layout, heads, len(blocks), "gpu", engine.stream.ptr)
    shard = layout.shard_bytes(heads)
    nh = heads[1] - heads[0]
    out = cupy.zeros((len(blocks), shard), dtype=cupy.uint8)
    base = np.uint64(out.data.ptr) + np.arange(len(blocks), dtype=np.uint64) * np.uint64(shard)
    with engine:
        engine.copy_rows(
            layouts.row_ops(geometry, np.arange(len(blocks)), base, nh * layout.head_bytes, True)
        )
        engine.sync()
    assert np.array_equal(cupy.asnumpy(out), want)

    # back into a zeroed pool: the same canonical bytes come out of it
    zeros = [cupy.zeros(shape, dtype=np_dtype) for _ in range(2)]
    if stacked:
        target = PagedKV(
            cupy.stack(zeros, axis=kv_dim),
            block_ids=blocks,
            layout=kind,
            stacked=True,
            kv_dim=kv_dim,
            head_start=head_start,
        )
    else:
        target = PagedKV(zeros[0], zeros[1], block_ids=blocks, layout=kind, head_start=head_start)
    g2 = layouts.resolve(target, layout, heads, len(blocks), "gpu", engine.stream.ptr)
    with engine:
        engine.copy_rows(layouts.row_ops(g2, np.arange(len(blocks)), base, nh * layout.head_bytes, False))
        engine.sync()
    host_target = (
        PagedKV(
            cupy.asnumpy(target.k),
            block_ids=blocks,
            layout=kind,
            stacked=True,
            kv_dim=kv_dim,
            head_start=head_start,
        )
        if stacked
        else PagedKV(
            cupy.asnumpy(target.k),
            cupy.asnumpy(target.v),
            block_ids=blocks,
            layout=kind,
            head_start=head_start,
        )
    )
    assert np.array_equal(
        layouts.gather_canonical(layouts.resolve(host_target, layout, heads, len(blocks), "cpu")), want
    )


def _namespace(writer, layers=3, kv_heads=4, head_dim=64):
    return writer.create_namespace(
        page_size=PAGE, num_layers=layers, kind="mha", kv_heads=kv_heads, head_dim=head_dim, dtype="bfloat16"
    )


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_canonical_gpu_put_and_get_roundtrip(cluster, client, namespace, transport):
    writer = client(cluster, namespace, transport=transport)
    layout = _namespace(writer)
    tokens = prompt(21, 9 * PAGE + 5)
    rng = np.random.default_rng(21)
    host = [rng.integers(0, 256, (9, layout.segment_bytes), dtype=np.uint8) for _ in range(3)]
    for layer in range(3):
        assert writer.put_layer(tokens, layer, cupy.asarray(host[layer])) == 9
    reader = client(cluster, namespace, transport=transport)
    out = cupy.zeros((3, 9, layout.segment_bytes), dtype=cupy.uint8)
    hit = reader.get_prefix(tokens, out=out)
    assert hit.num_pages == 9 and hit.data is out
    assert np.array_equal(cupy.asnumpy(out), np.stack(host))
    # a GPU writer and a CPU reader see identical bytes, and a head range reads right
    cpu = reader.get_prefix(tokens, heads=(1, 3))
    half = 4 * layout.head_bytes
    for layer in range(3):
        want = np.concatenate(
            [
                host[layer][:, h * half + layout.head_bytes : h * half + 3 * layout.head_bytes]
                for h in range(2)
            ],
            axis=1,
        )
        assert np.array_equal(cpu.layer(layer), want)
    part = cupy.zeros((1, 9, layout.shard_bytes((1, 3))), dtype=cupy.uint8)
    assert reader.get_prefix(tokens, layers=[2], heads=(1, 3), out=part).num_pages == 9
    assert np.array_equal(cupy.asnumpy(part[0]), cpu.layer(2))


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize(
    ("kind", "stacked"),
    [("token_major", False), ("token_major", True), ("head_major", False), ("head_major", True)],
)
def test_paged_gpu_put_and_get_roundtrip(cluster, client, namespace, transport, kind, stacked):
    writer = client(cluster, namespace, transport=transport)
    layout = _namespace(writer, layers=2, kv_heads=4, head_dim=64)
    tokens = prompt(31, 6 * PAGE)
    shape = (10, PAGE, 4, 64) if kind == "token_major" else (10, 4, PAGE, 64)
    blocks = np.array([8, 1, 6, 3, 9, 0])
    pools = []
    for layer in range(2):
        k, v = _pool(shape, np.uint16, 10 + layer), _pool(shape, np.uint16, 20 + layer)
        pools.append((k, v))
        paged = (
            PagedKV(cupy.asarray(np.stack([k, v])), block_ids=blocks, layout=kind, stacked=True)
            if stacked
            else PagedKV(cupy.asarray(k), cupy.asarray(v), block_ids=blocks, layout=kind)
        )
        assert writer.put_layer(tokens, layer, paged) == 6
    reader = client(cluster, namespace, transport=transport)
    cpu = reader.get_prefix(tokens)  # GPU writer, CPU reader
    wants = [
        layouts.gather_canonical(
            layouts.resolve(PagedKV(k, v, block_ids=blocks, layout=kind), layout, (0, 4), 6, "x")
        )
        for k, v in pools
    ]
    for layer in range(2):
        assert np.array_equal(cpu.layer(layer), wants[layer])
    out_blocks = np.array([2, 7, 4, 11, 5, 0])
    targets = [cupy.zeros((12, *shape[1:]), dtype=cupy.uint16) for _ in range(4)]
    outs = [PagedKV(targets[2 * i], targets[2 * i + 1], block_ids=out_blocks, layout=kind) for i in range(2)]
    hit = reader.get_prefix(tokens, out=outs)
    assert hit.num_pages == 6
    for layer in range(2):
        back = PagedKV(
            cupy.asnumpy(targets[2 * layer]),
            cupy.asnumpy(targets[2 * layer + 1]),
            block_ids=out_blocks,
            layout=kind,
        )
        assert np.array_equal(
            layouts.gather_canonical(layouts.resolve(back, layout, (0, 4), 6, "x")), wants[layer]
        )


def test_cpu_writer_gpu_reader_and_torch_bfloat16(cluster, client, namespace):
    torch = pytest.importorskip("torch")
    writer = client(cluster, namespace)
    layout = _namespace(writer, layers=1, kv_heads=4, head_dim=64)
    tokens = prompt(41, 5 * PAGE)
    host = np.random.default_rng(41).integers(0, 256, (5, layout.segment_bytes), dtype=np.uint8)
    assert writer.put_layer(tokens, 0, host) == 5
    reader = client(cluster, namespace)
    out = torch.zeros((1, 5, layout.segment_bytes // 2), dtype=torch.bfloat16, device="cuda")
    assert reader.get_prefix(tokens, out=out).num_pages == 5
    got = out.view(torch.int16).cpu().numpy().view(np.uint8).reshape(5, -1)
    assert np.array_equal(got, host)
    # torch CUDA bf16 paged pool (DLPack), TP rank 1 of 2
    tokens2 = prompt(42, 4 * PAGE)
    k = torch.randn(7, PAGE, 2, 64, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(7, PAGE, 2, 64, dtype=torch.bfloat16, device="cuda")
    blocks = [6, 2, 4, 0]
    assert writer.put_layer(tokens2, 0, PagedKV(k, v, block_ids=blocks), tp_rank=1, tp_size=2) == 4
    assert (
        writer.put_layer(
            tokens2, 0, np.zeros((4, layout.shard_bytes((0, 2))), dtype=np.uint8), tp_rank=0, tp_size=2
        )
        == 4
    )
    cpu = reader.get_prefix(tokens2, heads=(2, 4))
    want = (
        torch.stack([k[blocks].transpose(1, 2), v[blocks].transpose(1, 2)], dim=1)
        .contiguous()
        .view(torch.int16)
        .cpu()
        .numpy()
    )
    assert np.array_equal(cpu.layer(0), want.view(np.uint8).reshape(4, -1))


def test_torch_tensors_are_described_like_their_array_interface():
    torch = pytest.importorskip("torch")
    from kvstore.gpu import arrays

    base = torch.arange(6 * 10, dtype=torch.float32, device="cuda").reshape(6, 10)
    for tensor in (base, base[1:4, 2:7], base.t(), base.view(torch.uint8)[2:]):
        got = arrays.describe_device(tensor)
        want = arrays._from_cai(tensor, tensor.__cuda_array_interface__)
        assert got is not None and arrays.is_device_array(tensor)
        assert (got.ptr, got.shape, got.strides, got.itemsize, got.device, got.contiguous) == (
            want.ptr,
            want.shape,
            want.strides,
            want.itemsize,
            want.device,
            want.contiguous,
        )
    assert not arrays.is_torch_cuda_tensor(torch.zeros(3)) and arrays.describe_device(torch.zeros(3)) is None


def test_registered_pool_copy_equals_native_copy(cluster, client, namespace):
    """The same bytes land whether a put comes from the GPU kernel or the CPU copy engine."""
    a = client(cluster, namespace)
    layout = _namespace(a, layers=1)
    host = np.random.default_rng(5).integers(0, 256, (3, layout.segment_bytes), dtype=np.uint8)
    t1, t2 = prompt(51, 3 * PAGE), prompt(52, 3 * PAGE)
    a.put_layer(t1, 0, host)
    a.put_layer(t2, 0, cupy.asarray(host))
    h1, h2 = a.get_prefix(t1), a.get_prefix(t2)
    assert h1.num_pages == h2.num_pages == 3
    assert np.array_equal(h1.layer(0), h2.layer(0))
    assert (
        native.hash_ranges(np.array([[h1.layer(0).ctypes.data, h1.layer(0).nbytes]], dtype=np.uint64))[0]
        == native.hash_ranges(np.array([[h2.layer(0).ctypes.data, h2.layer(0).nbytes]], dtype=np.uint64))[0]
    )


# XXH3's paths: 0-16, 17-128, 129-240 bytes, then whole 1 KiB blocks, partial blocks and the last stripe
XXH3_LENGTHS = [
    *range(262),
    1023,
    1024,
    1025,
    1087,
    1088,
    2047,
    2048,
    4096,
    16397,
    65536,
    65537,
    (1 << 20) + 5,
]


@pytest.mark.parametrize("shift", [0, 8, 1], ids=["aligned16", "aligned8", "unaligned"])
def test_xxh3_kernel_equals_xxhash(shift):
    lengths = np.array(XXH3_LENGTHS, dtype=np.uint64)
    spans = (lengths + np.uint64(15)) // np.uint64(16) * np.uint64(16)
    starts = np.cumsum(spans) - spans + np.uint64(shift)
    host = np.random.default_rng(shift).integers(0, 256, int(spans.sum()) + 16, dtype=np.uint8)
    dev = cupy.asarray(host)
    engine = engine_for(0)
    with engine:
        got = engine.hash_ranges(np.stack([starts + np.uint64(dev.data.ptr), lengths], axis=1))
        engine.sync()
    want = native.hash_ranges(np.stack([starts + np.uint64(host.ctypes.data), lengths], axis=1))
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:10]


def test_fused_copy_hash_kernel_copies_and_hashes_like_the_host():
    from kvstore.gpu.engine import fusable

    rng = np.random.default_rng(11)
    lengths = [256, 272, 1008, 1024, 1040, 2048, 4096, 16 * 1000, 65536, 65552, (1 << 20) + 16]
    lengths += (rng.integers(16, 8192, 40) * 16).tolist()
    lengths_arr = np.array(lengths, dtype=np.uint64)
    size = int(lengths_arr.sum())
    src_host = rng.integers(0, 256, size, dtype=np.uint8)
    src = cupy.asarray(src_host)
    dst = cupy.zeros(size, dtype=cupy.uint8)
    src_off = np.cumsum(lengths_arr) - lengths_arr
    order = rng.permutation(len(lengths))  # scattered into another order
    dst_off = np.empty(len(lengths), dtype=np.uint64)
    dst_off[order] = np.cumsum(lengths_arr[order]) - lengths_arr[order]
    table = np.stack(
        [dst_off + np.uint64(dst.data.ptr), src_off + np.uint64(src.data.ptr), lengths_arr], axis=1
    )
    assert fusable(table)
    engine = engine_for(0)
    with engine:
        got = engine.copy_hash_segments(table)
    want_bytes = np.zeros(size, dtype=np.uint8)
    _emulate(table, want_bytes, src_host, dst.data.ptr, src.data.ptr)
    assert np.array_equal(cupy.asnumpy(dst), want_bytes)
    want = native.hash_ranges(np.stack([src_off + np.uint64(src_host.ctypes.data), lengths_arr], axis=1))
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:10]
    # the same rows relative to bases (a put session's table kept on the device), into a second copy
    dst2 = cupy.zeros(size + 4096, dtype=cupy.uint8)
    relative = np.stack([dst_off + np.uint64(4096), src_off, lengths_arr], axis=1)
    with engine:
        finish = engine.copy_hash_ops_queued(engine.upload_ops(relative), dst2.data.ptr, src.data.ptr)
    hashes, skipped = finish()
    assert np.array_equal(hashes, want) and skipped == 0
    assert np.array_equal(cupy.asnumpy(dst2[4096:]), want_bytes)
    # what the fused kernel does not take: unaligned rows, lengths not a multiple of 16, short rows
    assert not fusable(table + np.array([0, 8, 0], dtype=np.uint64))
    assert not fusable(np.array([[0, 0, 1000]], dtype=np.uint64))
    assert not fusable(np.array([[0, 0, 240]], dtype=np.uint64))


def test_gpu_write_checks_each_slots_generation_as_its_bytes_move():
    """The write kernel copies a slot only while it is at the batch's generation: a slot freed or
    reassigned between two layers of a put is left alone, and the write fails with SESSION_NOT_FOUND."""
    from kvstore import gpu as gpu_plane
    from kvstore import grants
    from kvstore._proto import kvstore_pb2 as pb
    from kvstore.errors import ErrorCode, KVStoreError
    from kvstore.tiers.dram import DramPool
    from kvstore.transports import CopyPlan, ShmTransport, node_batches

    layout = Layout.build("t/gpu-gen", 4, 3, kind="mha", kv_heads=4, head_dim=8, dtype="float16")
    # in shared memory, as a node's pools are: CUDA registers tmpfs pages, not a disk file's
    directory = tempfile.mkdtemp(prefix="kvstore-gpu-test-", dir="/dev/shm")
    pool = DramPool.create(directory, "node-a", 64 * layout.slot_bytes, prefault=False)
    try:
        offsets = np.array([4, 6, 9], dtype=np.uint64) * np.uint64(layout.slot_bytes)
        gens = np.full(3, 7, dtype=np.uint32)
        pool.set_generation(offsets, gens)
        incarnation = pool.header.incarnation
        grant = grants.sign(b"s" * 32, "node-a", incarnation, offsets, gens, 2**62, 1, grants.WRITE)
        node = pb.NodeRef(
            node_id="node-a",
            incarnation=incarnation,
            data_address="127.0.0.1:1",
            pool_path=pool.path,
            pool_data_offset=pool.header.data_offset,
            pool_bytes=len(pool.bytes),
        )
        placed = pb.Placements(
            nodes=[node],
            node_index=np.zeros(3, dtype="<u2").tobytes(),
            slot_offsets=offsets.astype("<u8").tobytes(),
            generations=gens.astype("<u4").tobytes(),
            slot_bytes=layout.slot_bytes,
            grants=[grant],
        )
        (batch,), _ = node_batches(placed, np.arange(3))
        transport = ShmTransport(pool)
        host = np.random.default_rng(4).integers(0, 256, (2, 3, layout.segment_bytes), dtype=np.uint8)

        def plan(layer: int) -> CopyPlan:
            side = gpu_plane.caller_side(cupy.asarray(host[layer]), "kv", layout, [layer], (0, 4), 3, False)
            assert side is not None
            return CopyPlan(layout, [layer], (0, 4), side.buffer, 3, side.gpu)

        def segment(slot: int, layer: int) -> np.ndarray:
            start = pool.header.data_offset + int(offsets[slot]) + layout.segment_offset(layer)
            return pool.bytes[start : start + layout.segment_bytes]

        hashes = transport.write(batch, plan(0))
        assert np.array_equal(np.asarray(hashes).reshape(-1), row_hashes(host[0]))
        pool.set_generation(offsets[1:2], np.array([8], dtype=np.uint32))  # slot 6 freed and reassigned
        with pytest.raises(KVStoreError) as info:
            transport.write(batch, plan(1))
        assert info.value.code is ErrorCode.SESSION_NOT_FOUND
        assert not segment(1, 1).any()  # never written
        assert np.array_equal(segment(0, 1), host[1, 0]) and np.array_equal(segment(2, 1), host[1, 2])
    finally:
        pool.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_xxh3_sees_the_bytes_queued_before_it():
    rng = np.random.default_rng(5)
    size = 8 << 20
    src = cupy.asarray(rng.integers(0, 256, size, dtype=np.uint8))
    dst = cupy.zeros(size, dtype=cupy.uint8)
    engine = engine_for(0)
    lengths = np.full(128, size // 128, dtype=np.uint64)
    offsets = np.cumsum(lengths) - lengths
    with engine:
        engine.copy_segments(
            np.stack([offsets + np.uint64(dst.data.ptr), offsets + np.uint64(src.data.ptr), lengths], axis=1)
        )
        got = engine.hash_ranges(np.stack([offsets + np.uint64(dst.data.ptr), lengths], axis=1))
        engine.sync()
    host = cupy.asnumpy(src)
    want = native.hash_ranges(np.stack([offsets + np.uint64(host.ctypes.data), lengths], axis=1))
    assert np.array_equal(got, want)


def test_gpu_put_commits_the_checksums_of_its_bytes(cluster, client, namespace):
    """The GPU-side hashes of a shm put are the host's XXH3 of the same bytes (whole range and a head range)."""
    from kvstore.layout import shard_checksums

    writer = client(cluster, namespace, transport="shm")
    layout = _namespace(writer)
    rng = np.random.default_rng(8)
    whole_tokens, tp_tokens = prompt(81, 6 * PAGE), prompt(82, 5 * PAGE)
    whole = rng.integers(0, 256, (6, layout.segment_bytes), dtype=np.uint8)
    assert writer.put_layer(whole_tokens, 0, cupy.asarray(whole)) == 6
    heads = (2, 4)  # rank 1 of 2: one run in the K half and one in the V half
    shard = rng.integers(0, 256, (5, layout.shard_bytes(heads)), dtype=np.uint8)
    assert writer.put_layer(tp_tokens, 0, cupy.asarray(shard), tp_rank=1, tp_size=2) == 5
    writer.flush()
    half = shard.shape[1] // 2
    run_hashes = row_hashes(np.stack([shard[:, :half], shard[:, half:]], axis=1).reshape(-1, half))
    expected = set(row_hashes(whole).tolist()) | set(shard_checksums(run_hashes, 2).tolist())
    address = cluster.nodes[0].control_address
    wait_for(lambda: expected <= committed_checksums(address), 5.0, "the GPU put's checksums on the node")


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_async_gpu_puts_pipeline_and_complete_once_landed(cluster, client, namespace, transport):
    """put_layer_async of GPU tensors: copies are queued back to back; each future completes once its bytes landed."""
    writer = client(cluster, namespace, transport=transport)
    layout = _namespace(writer)
    tokens = prompt(91, 7 * PAGE)
    rng = np.random.default_rng(91)
    host = [rng.integers(0, 256, (7, layout.segment_bytes), dtype=np.uint8) for _ in range(3)]
    futures = [writer.put_layer_async(tokens, layer, cupy.asarray(host[layer])) for layer in range(3)]
    assert [f.result(30) for f in futures] == [7, 7, 7]
    writer.flush()
    reader = client(cluster, namespace, transport=transport)
    out = cupy.zeros((3, 7, layout.segment_bytes), dtype=cupy.uint8)
    assert reader.get_prefix(tokens, out=out).num_pages == 7
    assert np.array_equal(cupy.asnumpy(out), np.stack(host))
    committed = committed_checksums(cluster.nodes[0].control_address)
    assert set(row_hashes(np.stack(host).reshape(-1, layout.segment_bytes)).tolist()) <= committed


def test_copy_engine_writes_queue_and_land_with_their_checksums(cluster, client, namespace, monkeypatch):
    """The copy-engine write path (hash from HBM, strided copies), synchronous and queued, lands intact."""
    monkeypatch.setattr(transfer, "RECT_WRITES", True)
    writer = client(cluster, namespace)
    layout = _namespace(writer)
    tokens = prompt(93, 5 * PAGE)
    rng = np.random.default_rng(93)
    host = [rng.integers(0, 256, (5, layout.segment_bytes), dtype=np.uint8) for _ in range(3)]
    assert writer.put_layer(tokens, 0, cupy.asarray(host[0])) == 5
    futures = [writer.put_layer_async(tokens, layer, cupy.asarray(host[layer])) for layer in (1, 2)]
    assert [f.result(30) for f in futures] == [5, 5]
    writer.flush()
    out = cupy.zeros((3, 5, layout.segment_bytes), dtype=cupy.uint8)
    assert client(cluster, namespace).get_prefix(tokens, out=out).num_pages == 5
    assert np.array_equal(cupy.asnumpy(out), np.stack(host))
    committed = committed_checksums(cluster.nodes[0].control_address)
    assert set(row_hashes(np.stack(host).reshape(-1, layout.segment_bytes)).tolist()) <= committed


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("paged", [False, True], ids=["canonical", "paged"])
def test_gpu_copies_wait_for_torch_work_queued_on_its_current_stream(
    cluster, client, namespace, transport, paged
):
    """put_layer copies what torch's still-queued kernels write into the source, and get_prefix lands
    after torch's still-queued writes of ``out``: an engine calls the SDK without synchronizing."""
    torch = pytest.importorskip("torch")
    writer = client(cluster, namespace, transport=transport)
    layout = _namespace(writer, layers=1, kv_heads=4, head_dim=64)
    tokens = prompt(95 + paged, 4 * PAGE)
    blocks = [5, 1, 3, 0]
    gen = torch.Generator(device="cuda").manual_seed(95)
    if paged:
        want = torch.randint(
            -(2**15), 2**15 - 1, (2, 6, PAGE, 4, 64), dtype=torch.int16, device="cuda", generator=gen
        )
    else:
        want = torch.randint(
            -(2**15),
            2**15 - 1,
            (4, layout.segment_bytes // 2),
            dtype=torch.int16,
            device="cuda",
            generator=gen,
        )

    def view(t):
        return PagedKV(t, block_ids=blocks, layout="token_major", stacked=True) if paged else t

    source = torch.zeros_like(want)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on torch's current stream
    source.copy_(want)  # queued behind it: the put must copy these bytes, not the zeros
    assert writer.put_layer(tokens, 0, view(source)) == 4
    out = torch.zeros_like(want)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    out.fill_(7)  # a write of out still queued: the read must land after it
    assert writer.get_prefix(tokens, out=[view(out)] if paged else out[None]).num_pages == 4
    if paged:
        assert torch.equal(out[:, blocks], want[:, blocks])
    else:
        assert torch.equal(out, want)
