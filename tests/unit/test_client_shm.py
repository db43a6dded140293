"""The same-host transport against a real DramPool created here, and the per-node transport choice."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash

from kvstore import grants
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.layout import Layout, shard_checksums
from kvstore.tiers.dram import DramPool
from kvstore.transports import CopyPlan, ShmTransport, TcpTransport, TransportSelector, node_batches
from kvstore.transports import shm as shm_module

LAYOUT = Layout.build("t/shm", 4, 3, kind="mha", kv_heads=4, head_dim=8, dtype="float16")
SECRET = b"s" * 32


@pytest.fixture
def pool(tmp_path) -> Iterator[DramPool]:  # type: ignore[no-untyped-def]
    p = DramPool.create(str(tmp_path), "node-a", 64 * LAYOUT.slot_bytes, prefault=False)
    yield p
    p.close()


def node_ref(pool: DramPool, node_id: str = "node-a") -> pb.NodeRef:
    return pb.NodeRef(
        node_id=node_id,
        incarnation=pool.header.incarnation,
        data_address="127.0.0.1:1",
        pool_path=pool.path,
        pool_data_offset=pool.header.data_offset,
        pool_bytes=len(pool.bytes),
    )


def placements(pool: DramPool, slots: list[int], generation: int = 7) -> pb.Placements:
    """Page p at slot index slots[p] of the one node, all at ``generation`` (set in the pool header too)."""
    offsets = np.array(slots, dtype=np.uint64) * np.uint64(LAYOUT.slot_bytes)
    gens = np.full(len(slots), generation, dtype=np.uint32)
    pool.set_generation(offsets, gens)
    grant = grants.sign(SECRET, "node-a", pool.header.incarnation, offsets, gens, 2**62, 1, grants.WRITE)
    return pb.Placements(
        nodes=[node_ref(pool)],
        node_index=np.zeros(len(slots), dtype="<u2").tobytes(),
        slot_offsets=offsets.astype("<u8").tobytes(),
        generations=gens.astype("<u4").tobytes(),
        slot_bytes=LAYOUT.slot_bytes,
        grants=[grant],
    )


def kv_for(layers: list[int], pages: int, heads: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(len(layers), pages, LAYOUT.shard_bytes(heads)), dtype=np.uint8)


def test_write_then_read_a_table_of_pages(pool: DramPool) -> None:
    slots = [5, 0, 9, 3]
    place = placements(pool, slots)
    (batch,), first_unplaced = node_batches(place, np.arange(len(slots)))
    assert first_unplaced == len(slots)
    transport = ShmTransport(pool, copy_threads=2)
    layers, heads = [0, 1, 2], (0, 4)
    kv = kv_for(layers, len(slots), heads)
    hashes = transport.write(batch, CopyPlan(LAYOUT, layers, heads, kv.reshape(-1), len(slots)))
    sums = shard_checksums(hashes.reshape(-1), 1).reshape(len(layers), len(slots))
    for li in range(len(layers)):
        for p, slot in enumerate(slots):
            start = slot * LAYOUT.slot_bytes + layers[li] * LAYOUT.segment_bytes
            landed = pool.bytes[pool.header.data_offset + start :][: LAYOUT.segment_bytes]
            np.testing.assert_array_equal(landed, kv[li, p])
            assert int(sums[li, p]) == xxhash.xxh3_64_intdigest(kv[li, p].tobytes())
    # read two of the layers back, in another order, into a caller's buffer
    out = np.zeros((2, len(slots), LAYOUT.segment_bytes), dtype=np.uint8)
    assert transport.read(batch, CopyPlan(LAYOUT, [2, 0], heads, out.reshape(-1), len(slots))) == len(slots)
    np.testing.assert_array_equal(out[0], kv[2])
    np.testing.assert_array_equal(out[1], kv[0])


def test_tensor_parallel_writers_and_a_reader_with_other_heads(pool: DramPool) -> None:
    slots = [1, 2]
    place = placements(pool, slots)
    (batch,), _ = node_batches(place, np.arange(2))
    transport = ShmTransport(pool)
    full = kv_for([0], 2, (0, 4), seed=3)  # the whole segment, canonical [K|V][heads][page][dim]
    as_heads = full.reshape(1, 2, 2, 4, LAYOUT.head_bytes)
    for rank in range(2):
        heads = LAYOUT.head_range(rank, 2)
        shard = np.ascontiguousarray(as_heads[:, :, :, heads[0] : heads[1]]).reshape(-1)
        transport.write(batch, CopyPlan(LAYOUT, [0], heads, shard, 2))
    out = np.zeros_like(full)
    transport.read(batch, CopyPlan(LAYOUT, [0], (0, 4), out.reshape(-1), 2))
    np.testing.assert_array_equal(out, full)
    middle = np.zeros((1, 2, LAYOUT.shard_bytes((1, 3))), dtype=np.uint8)
    transport.read(batch, CopyPlan(LAYOUT, [0], (1, 3), middle.reshape(-1), 2))
    np.testing.assert_array_equal(middle.reshape(1, 2, 2, 2, -1), as_heads[:, :, :, 1:3])


def test_write_refuses_slots_whose_generation_moved(pool: DramPool) -> None:
    place = placements(pool, [4, 6])
    (batch,), _ = node_batches(place, np.arange(2))
    pool.set_generation(np.array([6 * LAYOUT.slot_bytes], dtype=np.uint64), np.array([8], dtype=np.uint32))
    kv = kv_for([0], 2, (0, 4))
    before = pool.bytes.copy()
    with pytest.raises(KVStoreError) as info:
        ShmTransport(pool).write(batch, CopyPlan(LAYOUT, [0], (0, 4), kv.reshape(-1), 2))
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND
    np.testing.assert_array_equal(pool.bytes, before)  # nothing written


def test_generation_changed_before_the_read_truncates_the_hit(pool: DramPool) -> None:
    place = placements(pool, [0, 1, 2, 3])
    (batch,), _ = node_batches(place, np.arange(4))
    pool.set_generation(np.array([2 * LAYOUT.slot_bytes], dtype=np.uint64), np.array([9], dtype=np.uint32))
    out = np.zeros(4 * LAYOUT.segment_bytes, dtype=np.uint8)
    assert ShmTransport(pool).read(batch, CopyPlan(LAYOUT, [1], (0, 4), out, 4)) == 2


def test_generation_changed_during_the_copy_truncates_the_hit(pool: DramPool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    place = placements(pool, [0, 1, 2, 3])
    (batch,), _ = node_batches(place, np.arange(4))
    real_copy = shm_module.native.copy

    def copy_then_free_page_1(ops, with_hashes=False, threads=1):  # type: ignore[no-untyped-def]
        result = real_copy(ops, with_hashes=with_hashes, threads=threads)
        # the master freed page 1's slot and a writer reused it while we copied
        pool.set_generation(
            np.array([1 * LAYOUT.slot_bytes], dtype=np.uint64), np.array([8], dtype=np.uint32)
        )
        return result

    monkeypatch.setattr(shm_module.native, "copy", copy_then_free_page_1)
    out = np.zeros(4 * LAYOUT.segment_bytes, dtype=np.uint8)
    assert ShmTransport(pool).read(batch, CopyPlan(LAYOUT, [0], (0, 4), out, 4)) == 1


def test_pages_split_across_nodes_and_unplaced_pages() -> None:
    nodes = [pb.NodeRef(node_id="a"), pb.NodeRef(node_id="b")]
    place = pb.Placements(
        nodes=nodes,
        node_index=np.array([1, 0, 1, 0xFFFF, 0], dtype="<u2").tobytes(),
        slot_offsets=(np.arange(5, dtype="<u8") * 4096).tobytes(),
        generations=np.arange(5, dtype="<u4").tobytes(),
        slot_bytes=4096,
        grants=[pb.Grant(node_id="a"), pb.Grant(node_id="b")],
    )
    batches, first_unplaced = node_batches(place, np.arange(5))
    assert first_unplaced == 3
    by_node = {b.node.node_id: b for b in batches}
    assert by_node["a"].pages.tolist() == [1] and by_node["b"].pages.tolist() == [0, 2]
    assert by_node["b"].slot_offsets.tolist() == [0, 8192] and by_node["b"].generations.tolist() == [0, 2]
    assert by_node["b"].grant.node_id == "b"
    batches, _ = node_batches(place, np.array([1, 2]))  # a subset, as a put's new pages
    assert sorted(b.pages.tolist() for b in batches) == [[1], [2]]
    with pytest.raises(KVStoreError):
        node_batches(place, np.arange(6))  # more pages than placed


def test_selector_maps_same_host_pools_and_falls_back_to_tcp(pool: DramPool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    selector = TransportSelector("auto")
    try:
        first = selector.for_node(node_ref(pool))
        assert isinstance(first, ShmTransport)
        assert selector.for_node(node_ref(pool)) is first  # cached
        stale = node_ref(pool)
        stale.incarnation = os.urandom(16)  # the node restarted: the placement names another incarnation
        assert isinstance(selector.for_node(stale), TcpTransport)
        assert isinstance(
            selector.for_node(
                pb.NodeRef(node_id="remote", incarnation=os.urandom(16), pool_path="/nonexistent/pool")
            ),
            TcpTransport,
        )
        assert isinstance(selector.for_node(pb.NodeRef(node_id="no-pool")), TcpTransport)
    finally:
        selector.close()
    forced = TransportSelector("shm")
    try:
        with pytest.raises(KVStoreError) as info:
            forced.for_node(pb.NodeRef(node_id="remote", pool_path="/nonexistent/pool"))
        assert info.value.code is ErrorCode.STALE_INCARNATION
    finally:
        forced.close()
    tcp_only = TransportSelector("tcp")
    assert isinstance(tcp_only.for_node(node_ref(pool)), TcpTransport)
    tcp_only.close()


def test_selector_drops_a_pool_whose_node_went_away(tmp_path) -> None:  # type: ignore[no-untyped-def]
    owner = DramPool.create(str(tmp_path), "node-b", 16 * 4096, prefault=False)
    selector = TransportSelector("auto")
    try:
        ref = node_ref(owner, "node-b")
        shm = selector.for_node(ref)
        assert isinstance(shm, ShmTransport)
        owner.close()  # the node stops and unlinks its pool file
        assert isinstance(selector.for_node(ref), TcpTransport)
        with pytest.raises(KVStoreError) as info, shm.in_use():
            pass
        assert info.value.code is ErrorCode.STALE_INCARNATION  # retired: no new transfers
    finally:
        selector.close()


def test_retired_pool_stays_mapped_until_the_transfer_ends(pool: DramPool) -> None:
    selector = TransportSelector("auto")
    shm = selector.for_node(node_ref(pool))
    assert isinstance(shm, ShmTransport)
    with shm.in_use():
        selector.close()  # retires every mapped pool
        assert not shm._closed  # a copy in flight keeps the mapping
    assert shm._closed
