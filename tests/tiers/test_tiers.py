"""Tiers with real processes (issue 4): DRAM + NVMe regions, watermarks, demotion, promotion, pins, drain.

Each node gets a 16 MiB DRAM pool and a 32 MiB NVMe region (a file in a
temporary directory on disk).  Slots are 256 KiB (4 layers x 64 KiB): DRAM
holds 64 pages, NVMe 128.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.testing import page_bytes, prompt, put_or_no_room, wait_for

PAGE = 16
LAYERS = 4
SEGMENT = 64 << 10
SLOT = LAYERS * SEGMENT
DRAM_PAGES = 64

TIER_SETTINGS = dict(
    dram="16MiB",
    nvme="32MiB",
    high_watermark=0.75,
    low_watermark=0.5,
    quarantine_ms=100,
    arena_bytes="1MiB",
)


def _data(seed: int, pages: int) -> list[np.ndarray]:
    return [page_bytes(seed * 10 + layer, pages, SEGMENT) for layer in range(LAYERS)]


def _tiers(cluster) -> dict[tuple[str, str], pb.TierUsage]:
    return {(n.node_id, t.tier): t for n in cluster.stats().nodes for t in n.tiers}


def _check(c, tokens: np.ndarray, data: list[np.ndarray], pages: int) -> None:
    hit = c.get_prefix(tokens)
    assert hit.num_pages == pages, (hit.num_pages, pages)
    for layer in range(LAYERS):
        np.testing.assert_array_equal(hit.layer(layer), data[layer][:pages])


def _fill(c, first_seed: int, prompts: int, pages: int = 4) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    written = []
    for i in range(prompts):
        tokens = prompt(first_seed + i, pages * PAGE)
        data = _data(first_seed + i, pages)
        assert put_or_no_room(c, tokens, data) == pages
        written.append((tokens, data))
        time.sleep(0.05)  # let the sweep demote between puts (a tick is 100 ms)
    return written


@pytest.fixture
def tiered(make_cluster, client):
    def make(nodes: int = 1, **overrides):
        settings = {**TIER_SETTINGS, **overrides}
        cluster = make_cluster(nodes, **settings)
        c = client(cluster, "tiers/ns")
        c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
        return cluster, c

    return make


def test_filling_dram_demotes_to_nvme_and_reads_come_back_identical(tiered):
    cluster, c = tiered()
    written = _fill(c, 100, 20)  # 80 pages: more than DRAM's 64
    wait_for(
        lambda: _tiers(cluster)[("node0", "dram")].allocated_bytes <= 0.75 * 16 * 2**20,
        10.0,
        "DRAM to fall under its high watermark",
    )
    usage = _tiers(cluster)
    assert usage[("node0", "dram")].demotions > 0
    assert usage[("node0", "nvme")].pages > 0
    assert usage[("node0", "dram")].evictions == 0, "NVMe had room: nothing should have been evicted"
    # every prompt reads back whole and identical, the demoted ones through promotion
    for tokens, data in written:
        _check(c, tokens, data, 4)
    assert _tiers(cluster)[("node0", "dram")].promotions > 0


def test_filling_everything_evicts_leaves_first(tiered):
    cluster, c = tiered()
    # chains of a base (2 pages) and an extension (2 more): 48 chains x 4 pages = 192 pages > 64 + 128
    chains = []
    for i in range(48):
        base = prompt(500 + i, 2 * PAGE)
        ext = np.concatenate([base, prompt(900 + i, 2 * PAGE)])
        data = _data(500 + i, 4)
        put_or_no_room(c, base, [d[:2] for d in data])
        put_or_no_room(c, ext, data)
        chains.append((ext, data))
        time.sleep(0.02)
    usage = _tiers(cluster)
    assert sum(t.evictions for t in usage.values()) > 0
    time.sleep(0.3)  # let the last tick finish
    # leaves first: no page was dropped while a page extending it stayed, so every stored page is
    # reachable from its chain's start (an orphan would count in the stats but in no match)
    matched = [c.match_prefix(ext) // PAGE for ext, _ in chains]
    assert cluster.stats().pages == sum(matched)
    assert sum(matched) > 0
    # invariant 3: what is matched reads back exactly
    for (ext, data), pages in zip(chains, matched, strict=True):
        hit = c.get_prefix(ext)
        assert hit.num_pages <= pages
        for layer in range(LAYERS):
            np.testing.assert_array_equal(hit.layer(layer), data[layer][: hit.num_pages])


def test_a_lease_taken_before_demotion_reads_the_old_bytes(tiered):
    cluster, c = tiered(read_lease_ms=60_000)
    tokens = prompt(1, 4 * PAGE)
    data = _data(1, 4)
    assert put_or_no_room(c, tokens, data) == 4
    lease = c.acquire_prefix(tokens)
    assert lease.num_pages == 4
    _fill(c, 200, 20)  # pressure: DRAM demotes everything it may
    wait_for(lambda: _tiers(cluster)[("node0", "dram")].demotions > 0, 10.0, "demotions to happen")
    # the leased pages were neither moved nor freed: the lease still reads them, at the same slots
    granted = lease._response.placements
    for _ in range(3):
        _fill(c, 400 + _ * 50, 8)
        hit = c.get_prefix(tokens, lease=lease)
        assert hit.num_pages == 4
        for layer in range(LAYERS):
            np.testing.assert_array_equal(hit.layer(layer), data[layer])
        stub = pb_grpc.KVStoreStub(cluster.channel)
        described = stub.DescribeLease(pb.DescribeLeaseRequest(lease_id=lease.lease_id), timeout=5)
        assert described.num_pages == 4
        assert described.placements.slot_offsets == granted.slot_offsets
        assert described.placements.generations == granted.generations
    assert c.release(lease)


def test_a_lease_never_released_expires(tiered):
    cluster, c = tiered(read_lease_ms=300, max_lease_ms=500)
    tokens = prompt(2, 2 * PAGE)
    assert put_or_no_room(c, tokens, _data(2, 2)) == 2
    lease = c.acquire_prefix(tokens, lease_ms=10_000)  # capped at max_lease_ms
    assert lease.expires_unix_ms <= time.time() * 1000 + 600
    wait_for(lambda: cluster.stats().active_read_leases == 0, 5.0, "the forgotten lease to expire")
    # matching does not renew anything
    c.match_prefix(tokens)
    assert cluster.stats().active_read_leases == 0


def test_pins_hold_until_their_ttl(tiered):
    cluster, c = tiered(max_pin_ms=1500)
    hot = prompt(3, 4 * PAGE)
    hot_data = _data(3, 4)
    assert put_or_no_room(c, hot, hot_data) == 4
    assert c.pin_prefix(hot, ttl_s=3600) == 4 * PAGE  # capped at 1.5 s by max_pin_ms
    _fill(c, 300, 12)  # DRAM past high: demotion takes the others, not the pinned pages
    wait_for(lambda: _tiers(cluster)[("node0", "dram")].demotions > 0, 10.0, "demotions")
    # LRU would have demoted the hot prompt first (it is the oldest): the pin kept it in DRAM
    stub_kv = pb_grpc.KVStoreStub(cluster.channel)
    acquired = stub_kv.AcquirePrefix(
        pb.AcquirePrefixRequest(namespace="tiers/ns", keys=_keys(c, hot)), timeout=5
    )
    assert acquired.num_pages == 4
    assert _tiers(cluster)[("node0", "dram")].promotions == 0, "the pinned pages never left DRAM"
    stub_kv.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=acquired.lease_id), timeout=5)
    stub = pb_grpc.AdminStub(cluster.channel)
    stub.Evict(pb.EvictRequest(namespace="tiers/ns", all=False), timeout=5)
    assert c.match_prefix(hot) == 4 * PAGE, "a pinned prefix survives admin eviction too"
    time.sleep(1.6)
    stub.Evict(pb.EvictRequest(namespace="tiers/ns"), timeout=5)
    assert c.match_prefix(hot) == 0, "the pin ended with its TTL"
    # unpin ends a pin at once
    assert put_or_no_room(c, hot, hot_data) == 4
    assert c.pin_prefix(hot, ttl_s=60) == 4 * PAGE
    assert c.unpin_prefix(hot) == 4 * PAGE
    stub.Evict(pb.EvictRequest(namespace="tiers/ns"), timeout=5)
    assert c.match_prefix(hot) == 0


def _keys(c, tokens: np.ndarray) -> bytes:
    from kvstore import keys

    return keys.pack_keys(keys.page_keys(keys.namespace_root("tiers/ns"), tokens, PAGE))


def test_drain_moves_everything_that_fits_then_unregisters(tiered):
    cluster, c = tiered(nodes=2)
    written = []
    for i in range(10):
        tokens = prompt(700 + i, 4 * PAGE)
        data = _data(700 + i, 4)
        assert put_or_no_room(c, tokens, data) == 4
        written.append((tokens, data))
    usage = _tiers(cluster)
    source = max(("node0", "node1"), key=lambda n: usage[(n, "dram")].pages)
    stub = pb_grpc.AdminStub(cluster.channel)
    reply = stub.DrainNode(pb.DrainNodeRequest(node_id=source), timeout=5)
    assert reply.state in ("running", "done")
    reply = wait_for(
        lambda: (
            (r := stub.DrainNode(pb.DrainNodeRequest(node_id=source, status_only=True), timeout=5)).state
            != "running"
            and r
        ),
        30.0,
        "the drain to finish",
    )
    assert reply.state == "done", reply
    assert reply.pages_unplaced == 0
    nodes = {n.node_id: n for n in cluster.list_nodes().nodes}
    assert not nodes[source].alive
    for tokens, data in written:
        _check(c, tokens, data, 4)


def test_bad_input_for_the_tier_rpcs(tiered):
    cluster, c = tiered()
    kv = pb_grpc.KVStoreStub(cluster.channel)
    admin = pb_grpc.AdminStub(cluster.channel)
    cases = [
        (kv.PinPrefix, pb.PinPrefixRequest(namespace="tiers/ns", keys=b"x" * 17, ttl_ms=10)),
        (kv.PinPrefix, pb.PinPrefixRequest(namespace="tiers/ns", keys=b"k" * 16, ttl_ms=0)),
        (kv.PinPrefix, pb.PinPrefixRequest(namespace="nope", keys=b"k" * 16, ttl_ms=10)),
        (kv.UnpinPrefix, pb.UnpinPrefixRequest(namespace="tiers/ns", keys=b"")),
        (admin.DrainNode, pb.DrainNodeRequest(node_id="")),
        (admin.DrainNode, pb.DrainNodeRequest(node_id="no-such-node")),
        (admin.Evict, pb.EvictRequest(keys=b"k" * 16)),
        (admin.Evict, pb.EvictRequest(tier="tape")),
        (admin.Evict, pb.EvictRequest(node_id="no-such-node")),
    ]
    for method, request in cases:
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=5)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            request,
            err.value,
        )
    # the node's move RPCs refuse malformed tables and unknown regions, and keep serving
    node = pb_grpc.NodeStub(grpc.insecure_channel(cluster.nodes[0].control_address))
    node_cases = [
        (node.MoveSlots, pb.MoveSlotsRequest(src_tier="dram", dst_tier="nvme", src_slots=b"123")),
        (node.MoveSlots, pb.MoveSlotsRequest(src_tier="dram", dst_tier="vram")),
        (node.MoveSlots, pb.MoveSlotsRequest(src_tier="dram", dst_tier="dram")),
        (
            node.MoveSlots,
            pb.MoveSlotsRequest(
                src_tier="dram",
                dst_tier="nvme",
                src_slots=np.array([1], "<u8").tobytes(),
                src_generations=np.array([1], "<u4").tobytes(),
                dst_slots=np.array([0], "<u8").tobytes(),
                dst_generations=np.array([1], "<u4").tobytes(),
            ),
        ),
        (node.PullSlots, pb.PullSlotsRequest(dst_tier="dram")),
        (node.DescribeSlots, pb.DescribeSlotsRequest(tier="nvme", slots=b"12")),
    ]
    for method, request in node_cases:
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.value)
    tokens = prompt(4, 2 * PAGE)
    data = _data(4, 2)
    assert put_or_no_room(c, tokens, data) == 2
    _check(c, tokens, data, 2)
