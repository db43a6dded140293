"""The Master's logic without gRPC: put/get paths, TP shards, eviction, leases, nodes, namespaces."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from kvstore import config, grants, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.master.core import Master
from kvstore.metadata.embedded import EmbeddedBackend

MiB = 1 << 20
NEW, STORED, NO_ROOM = pb.PAGE_NEW, pb.PAGE_ALREADY_STORED, pb.PAGE_NO_ROOM


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A master with an injected clock and fake nodes that record what they are told."""

    def __init__(self, **settings: Any) -> None:
        defaults = {
            "read_lease_ms": 2000,
            "write_lease_ms": 2000,
            "quarantine_ms": 500,
            "node_ttl_ms": 1500,
            "arena_bytes": 1 * MiB,
        }
        defaults.update(settings)
        self.cfg = config.load(defaults, environ={})
        self.clock = Clock()
        self.updates: dict[int, list[pb.SlotUpdates]] = {}
        self.down: set[int] = set()
        self.silent: set[str] = set()  # nodes that stop heartbeating
        self.on_send: Callable[[int], None] | None = None
        self.master = Master(self.cfg, EmbeddedBackend(), clock=self.clock, sender=self._send)
        self.inventory: dict[str, pb.InventoryResponse] = {}

        async def inventory(record: Any) -> pb.InventoryResponse:
            return self.inventory.get(record.node_id, pb.InventoryResponse())

        self.master.nodes.inventory = inventory  # type: ignore[method-assign]
        run(self.master.start("test:1", background=False))

    async def _send(self, node: int, msg: pb.SlotUpdates) -> None:
        if node in self.down:
            raise ConnectionError("down")
        if self.on_send is not None:
            self.on_send(node)
        self.updates.setdefault(node, []).append(msg)

    def node(self, node_id: str, capacity: int = 16 * MiB, host: str = "h1", incarnation: bytes = b"") -> int:
        req = pb.RegisterNodeRequest(
            node_id=node_id,
            incarnation=incarnation or node_id.encode().ljust(16, b"."),
            host_id=host,
            control_address="127.0.0.1:1",
            data_address="127.0.0.1:2",
            pool_path="/dev/shm/x",
            regions=[pb.RegionInfo(tier="dram", capacity_bytes=capacity)],
        )
        run(self.master.register_node(req))
        return self.master.nodes.by_id[node_id].index

    def namespace(self, name: str = "ns", **spec: Any) -> bytes:
        fields = {"page_size": 4, "num_layers": 2, "segment_bytes": 32 * 1024}
        fields.update(spec)
        run(self.master.create_namespace(pb.NamespaceSpec(name=name, **fields)))
        return self.master.namespaces[name].root

    def keys(self, tokens: Any, name: str = "ns") -> bytes:
        ns = self.master.namespaces[name]
        return keys.pack_keys(keys.page_keys(ns.root, np.asarray(tokens), ns.layout.page_size))

    def put(self, packed: bytes, name: str = "ns", **kw: Any) -> pb.OpenPutResponse:
        return run(self.master.open_put(name, packed, **kw))

    def commit_all(self, resp: pb.OpenPutResponse, layers: int = 2) -> tuple[int, bool]:
        pages = int(np.count_nonzero(np.frombuffer(resp.status, np.uint8) == NEW))
        result = (0, False)
        for layer in range(layers):
            result = self.master.commit_layer(
                resp.session_id, np.array([layer]), np.arange(pages, dtype=np.uint64)
            )
        return result

    def match(self, packed: bytes, name: str = "ns") -> int:
        return run(self.master.match_prefix(name, packed))

    def advance(self, seconds: float) -> None:
        """Time passes; every node not in ``silent`` heartbeats; then one sweep."""
        self.clock.now += seconds
        for record in self.master.nodes.live():
            if record.node_id not in self.silent:
                self.master.heartbeat(record.node_id, record.incarnation)
        self.master.sweep()

    def flush(self) -> None:
        run(self.master.notifier.flush_all())


_LOOP = asyncio.new_event_loop()  # one loop for every test: the master's asyncio objects live on it


def run(coro: Awaitable[Any]) -> Any:
    return _LOOP.run_until_complete(coro)


def status(resp: pb.OpenPutResponse) -> list[int]:
    return np.frombuffer(resp.status, np.uint8).tolist()


def expect(code: ErrorCode, fn: Callable[[], Any]) -> KVStoreError:
    with pytest.raises(KVStoreError) as info:
        fn()
    assert info.value.code == code, info.value
    return info.value


@pytest.fixture()
def h() -> Harness:
    harness = Harness()
    harness.node("n1")
    harness.namespace()
    return harness


# ---------------------------------------------------------------- put / match


def test_put_commit_match_and_first_writer_wins(h: Harness) -> None:
    packed = h.keys(range(16))  # 4 pages
    resp = h.put(packed, client_host="h1")
    assert status(resp) == [NEW] * 4
    assert resp.head_begin == 0 and resp.head_end == 1
    place = resp.placements
    assert np.frombuffer(place.node_index, "<u2").tolist() == [0] * 4
    assert place.slot_bytes == 64 * 1024
    assert len(place.grants) == 1 and place.grants[0].rights == grants.WRITE
    # the assignments reached the node before OpenPut answered
    (assign,) = h.updates[0]
    assert (
        np.frombuffer(assign.assign_slots, "<u8").tolist()
        == np.frombuffer(place.slot_offsets, "<u8").tolist()
    )
    assert assign.assign_keys == packed
    assert assign.assign_parents == bytes(16) + packed[:48]

    assert status(h.put(packed)) == [STORED] * 4  # claimed by a live writer
    assert h.match(packed) == 0
    assert h.master.commit_layer(resp.session_id, np.array([0]), np.arange(4, dtype=np.uint64)) == (0, False)
    assert h.match(packed) == 0  # a layer is missing
    assert h.master.commit_layer(resp.session_id, np.array([1]), np.arange(4, dtype=np.uint64)) == (4, True)
    assert h.match(packed) == 4
    assert status(h.put(packed)) == [STORED] * 4
    h.flush()
    commits = h.updates[0][-1]
    # both layers' commit records went out in one batch, in commit order
    assert np.frombuffer(commits.commit_layers, "<u2").tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert np.frombuffer(commits.commit_checksums, "<u8").tolist() == [0, 1, 2, 3] * 2


def test_prefix_match_stops_at_an_incomplete_page(h: Harness) -> None:
    first = h.keys(range(8))
    h.commit_all(h.put(first))
    longer = h.keys(range(16))
    resp = h.put(longer)
    assert status(resp) == [STORED, STORED, NEW, NEW]
    h.master.commit_layer(resp.session_id, np.array([0]), np.arange(2, dtype=np.uint64))
    assert h.match(longer) == 2
    h.master.commit_layer(resp.session_id, np.array([1]), np.arange(2, dtype=np.uint64))
    assert h.match(longer) == 4
    # a divergent suffix shares only the common pages
    divergent = h.keys(list(range(8)) + [99] * 8)
    assert h.match(divergent) == 2


def test_tensor_parallel_writers_share_pages() -> None:
    h = Harness()
    h.node("n1")
    h.namespace(
        "mha",
        page_size=4,
        num_layers=2,
        segment_bytes=0,
        geometry=pb.Geometry(kind="mha", kv_heads=4, head_dim=16, dtype="float16"),
    )
    packed = h.keys(range(8), "mha")
    r0 = h.put(packed, "mha", tp_rank=0, tp_size=2)
    r1 = h.put(packed, "mha", tp_rank=1, tp_size=2)
    assert status(r0) == status(r1) == [NEW, NEW]
    assert (r0.head_begin, r0.head_end, r1.head_begin, r1.head_end) == (0, 2, 2, 4)
    assert r0.placements.slot_offsets == r1.placements.slot_offsets  # one slot per page
    assert status(h.put(packed, "mha", tp_rank=1, tp_size=2)) == [STORED, STORED]  # heads taken
    assert status(h.put(packed, "mha", tp_rank=0, tp_size=4)) == [STORED, STORED]  # overlaps rank 0 of 2
    assert h.commit_all(r0) == (0, True)
    assert h.match(packed, "mha") == 0
    assert h.commit_all(r1) == (2, True)
    assert h.match(packed, "mha") == 2


def test_no_room_gives_the_longest_prefix_that_fits() -> None:
    h = Harness(quarantine_ms=0)
    h.node("n1", capacity=4 * 64 * 1024)  # room for 4 pages of 64 KiB
    h.namespace()
    h.commit_all(h.put(h.keys(range(8))))  # pages 0-1
    resp = h.put(h.keys(range(28)))  # 7 pages: 2 stored, 2 fit, 3 do not
    # the stored pages of this very request are never evicted for it
    assert status(resp) == [STORED, STORED, NEW, NEW, NO_ROOM, NO_ROOM, NO_ROOM]
    assert np.frombuffer(resp.placements.node_index, "<u2").tolist()[4:] == [0xFFFF] * 3


def test_full_node_evicts_lru_leaves_for_a_new_request() -> None:
    h = Harness(quarantine_ms=0)
    h.node("n1", capacity=4 * 64 * 1024)
    h.namespace()
    old = h.keys(range(16))
    h.commit_all(h.put(old))
    h.clock.now += 1
    resp = h.put(h.keys([7] * 8))
    assert status(resp) == [NEW, NEW]
    assert h.match(old) == 2  # the two leaves of the old chain went, its prefix stays


def test_pages_past_the_first_no_room_are_no_room_even_if_stored() -> None:
    h = Harness(quarantine_ms=0)
    h.node("n1", capacity=2 * 64 * 1024)
    h.namespace()
    resp = h.put(h.keys(range(8)))
    h.commit_all(resp)
    h.master.index.lease_count[: h.master.index.high] = 1  # nothing evictable
    resp = h.put(h.keys([5] * 4 + list(range(8))))
    assert status(resp)[0] == NO_ROOM and set(status(resp)) == {NO_ROOM}


def test_session_expiry_reclaims_pending_pages_and_quarantines_slots(h: Harness) -> None:
    packed = h.keys(range(8))
    resp = h.put(packed)
    h.master.commit_layer(resp.session_id, np.array([0]), np.arange(2, dtype=np.uint64))
    node = h.master.nodes.by_index[0]
    assert node.allocator.allocated_bytes == 2 * 64 * 1024
    h.advance(1.9)
    assert len(h.master.index) == 2
    h.advance(0.2)
    assert len(h.master.index) == 0
    expect(
        ErrorCode.SESSION_NOT_FOUND,
        lambda: h.master.commit_layer(resp.session_id, np.array([1]), np.arange(2, dtype=np.uint64)),
    )
    assert node.allocator.quarantined_bytes == 2 * 64 * 1024
    h.flush()
    frees = h.updates[0][-1]
    assert (
        np.frombuffer(frees.free_slots, "<u8").tolist()
        == np.frombuffer(resp.placements.slot_offsets, "<u8").tolist()
    )
    assert np.frombuffer(frees.free_generations, "<u4").tolist() == [2, 2]
    h.advance(0.5)
    assert node.allocator.quarantined_bytes == 0
    # the slots come back with a generation no grant for the old page carries
    again = h.put(packed)
    assert np.frombuffer(again.placements.generations, "<u4").min() >= 3


def test_abort_frees_the_session_pages(h: Harness) -> None:
    resp = h.put(h.keys(range(8)))
    assert h.master.abort_put(resp.session_id) == 2
    assert len(h.master.index) == 0
    expect(ErrorCode.SESSION_NOT_FOUND, lambda: h.master.abort_put(resp.session_id))


def test_commit_validation(h: Harness) -> None:
    resp = h.put(h.keys(range(8)))
    expect(
        ErrorCode.BAD_RANGE,
        lambda: h.master.commit_layer(resp.session_id, np.array([2]), np.zeros(2, np.uint64)),
    )
    expect(
        ErrorCode.INVALID_ARGUMENT,
        lambda: h.master.commit_layer(resp.session_id, np.array([0]), np.zeros(3, np.uint64)),
    )
    expect(
        ErrorCode.SESSION_NOT_FOUND,
        lambda: h.master.commit_layer(12345, np.array([0]), np.zeros(2, np.uint64)),
    )


def test_open_put_validation(h: Harness) -> None:
    packed = h.keys(range(8))
    expect(ErrorCode.NAMESPACE_NOT_FOUND, lambda: h.put(packed, name="nope"))
    expect(ErrorCode.BAD_KEYS, lambda: h.put(packed[:16] * 2))
    expect(ErrorCode.BAD_RANGE, lambda: h.put(packed, tp_rank=2, tp_size=2))
    expect(ErrorCode.INVALID_ARGUMENT, lambda: h.put(packed[16:], parent_key=bytes(range(16))))
    expect(ErrorCode.BAD_KEYS, lambda: h.put(packed, parent_key=packed[16:]))


def test_parent_key_continues_a_stored_chain(h: Harness) -> None:
    full = h.keys(range(16))
    h.commit_all(h.put(full[:32]))
    resp = h.put(full[32:], parent_key=full[16:32])
    assert status(resp) == [NEW, NEW]
    h.commit_all(resp)
    assert h.match(full) == 4


# ---------------------------------------------------------------- leases


def test_acquire_leases_and_grants_verify(h: Harness) -> None:
    packed = h.keys(range(12))
    h.commit_all(h.put(packed))
    acq = run(h.master.acquire_prefix("ns", packed + h.keys([1] * 4)))
    assert acq.num_pages == 3 and acq.keys == packed
    assert acq.expires_unix_ms == int((h.clock.now + 2.0) * 1000)
    node = h.master.nodes.by_index[0]
    verified = grants.verify(
        h.master.grant_secret,
        acq.placements.grants[0],
        node.node_id,
        node.incarnation,
        grants.READ,
        now_ms=int(h.clock.now * 1000),
    )
    assert verified.slots.tolist() == np.frombuffer(acq.placements.slot_offsets, "<u8").tolist()
    described = h.master.describe_lease(acq.lease_id)
    assert described.num_pages == 3 and described.placements.slot_offsets == acq.placements.slot_offsets
    assert h.master.release_lease(acq.lease_id)
    assert not h.master.release_lease(acq.lease_id)
    expect(ErrorCode.LEASE_NOT_FOUND, lambda: h.master.describe_lease(acq.lease_id))
    stats = h.master.cluster_stats()
    assert (stats.hits, stats.lookups) == (3, 4)
    assert stats.nodes[0].tiers[0].hits == 3


def test_leased_pages_survive_eviction_until_the_lease_expires(h: Harness) -> None:
    packed = h.keys(range(8))
    h.commit_all(h.put(packed))
    acq = run(h.master.acquire_prefix("ns", packed))
    assert run(h.master.admin_evict("", True)) == (0, 2)
    h.advance(2.1)  # the lease expires
    assert run(h.master.admin_evict("ns", False)) == (2, 0)
    expect(ErrorCode.LEASE_NOT_FOUND, lambda: h.master.describe_lease(acq.lease_id))
    expect(ErrorCode.INVALID_ARGUMENT, lambda: run(h.master.admin_evict("", False)))


def test_matching_updates_recency_but_never_leases(h: Harness) -> None:
    a, b = h.keys(range(4)), h.keys([9] * 4)
    h.commit_all(h.put(a))
    h.clock.now += 1
    h.commit_all(h.put(b))
    h.clock.now += 1
    assert h.match(a) == 1
    assert h.master.index.lease_count.sum() == 0
    victims = h.master.eviction.select(h.master.index, 1, h.clock.now)
    assert h.master.index.lookup(0, b).tolist() == victims.tolist()


def test_watermark_eviction_runs_in_the_background() -> None:
    h = Harness(high_watermark=0.5, low_watermark=0.25, quarantine_ms=0)
    h.node("n1", capacity=8 * 64 * 1024)
    h.namespace()
    h.commit_all(h.put(h.keys(range(24))))  # 6 of 8 slots
    h.advance(0.1)
    assert h.master.nodes.by_index[0].allocator.allocated_bytes <= 2 * 64 * 1024
    assert h.master.nodes.by_index[0].evictions == 4


def test_quota_limits_a_namespace() -> None:
    h = Harness(quarantine_ms=0)
    h.node("n1")
    h.namespace(quota_bytes=3 * 64 * 1024)
    resp = h.put(h.keys(range(20)))
    assert status(resp) == [NEW] * 3 + [NO_ROOM] * 2


# ---------------------------------------------------------------- nodes


def test_dead_node_takes_its_pages_and_a_lease_sees_the_loss() -> None:
    h = Harness()
    h.node("a", host="ha")
    h.node("b", host="hb")
    h.namespace()
    packed = h.keys(range(8))
    first = h.put(packed[:16], client_host="ha")
    h.commit_all(first)
    second = h.put(packed, client_host="hb")
    h.commit_all(second)
    assert np.frombuffer(second.placements.node_index, "<u2").tolist() == [0xFFFF, 0]
    assert second.placements.nodes[0].node_id == "b"
    acq = run(h.master.acquire_prefix("ns", packed))
    assert acq.num_pages == 2 and [n.node_id for n in acq.placements.nodes] == ["a", "b"]
    h.silent.add("a")
    h.advance(1.0)
    assert len(h.master.nodes.live()) == 2
    h.advance(0.6)  # a is silent for 1.6 s > ttl
    assert [n.node_id for n in h.master.node_statuses() if n.alive] == ["b"]
    assert h.match(packed) == 0
    assert h.master.describe_lease(acq.lease_id).num_pages == 0
    assert not h.master.heartbeat("a", b"a".ljust(16, b"."))
    # page 1 (on b) lost its parent: unreachable until the chain is put again, which links it back
    again = h.put(packed, client_host="hb")
    assert status(again) == [NEW, STORED]
    h.commit_all(again)
    assert h.match(packed) == 2


def test_a_node_restart_drops_the_old_incarnation() -> None:
    h = Harness()
    h.node("a")
    h.namespace()
    packed = h.keys(range(8))
    h.commit_all(h.put(packed))
    h.node("a", incarnation=b"x" * 16)
    assert h.match(packed) == 0
    assert len(h.master.nodes) == 1
    assert status(h.put(packed)) == [NEW, NEW]


def test_registration_frees_what_the_node_still_holds() -> None:
    h = Harness()
    h.inventory["a"] = pb.InventoryResponse(
        slots=pb.SlotUpdates(
            assign_slots=np.array([0, 65536], "<u8").tobytes(),
            assign_generations=np.array([7, 3], "<u4").tobytes(),
        )
    )
    index = h.node("a")
    h.flush()
    (frees,) = h.updates[index]
    assert np.frombuffer(frees.free_generations, "<u4").tolist() == [8, 8]
    h.namespace()
    resp = h.put(h.keys(range(4)))
    assert np.frombuffer(resp.placements.generations, "<u4").tolist() == [9]


def test_unreachable_node_fails_the_put_and_is_declared_dead() -> None:
    h = Harness()
    index = h.node("a")
    h.namespace()
    h.down.add(index)
    expect(ErrorCode.UNAVAILABLE, lambda: h.put(h.keys(range(8))))
    assert len(h.master.index) == 0
    h.clock.now += 2.0
    h.flush()  # still failing after the node TTL
    assert not h.master.nodes.live()


def test_node_lost_while_open_put_waits_for_it() -> None:
    h = Harness()
    h.node("a")
    h.namespace()
    h.on_send = lambda node: h.master._drop_node(h.master.nodes.by_index[node])
    expect(ErrorCode.UNAVAILABLE, lambda: h.put(h.keys(range(8))))
    assert len(h.master.index) == 0 and not h.master.nodes.live()


# ---------------------------------------------------------------- namespaces and extras


def test_namespace_create_is_idempotent_and_mismatch_is_an_error(h: Harness) -> None:
    spec, created = run(
        h.master.create_namespace(
            pb.NamespaceSpec(name="ns", page_size=4, num_layers=2, segment_bytes=32 * 1024)
        )
    )
    assert not created
    err = expect(
        ErrorCode.NAMESPACE_MISMATCH,
        lambda: run(
            h.master.create_namespace(
                pb.NamespaceSpec(name="ns", page_size=4, num_layers=3, segment_bytes=32 * 1024)
            )
        ),
    )
    assert "num_layers" in err.message
    geo, created = run(
        h.master.create_namespace(
            pb.NamespaceSpec(
                name="g",
                page_size=16,
                num_layers=1,
                geometry=pb.Geometry(kind="mla", head_dim=64, dtype="bfloat16"),
            )
        )
    )
    assert created and geo.segment_bytes == 16 * 64 * 2 and geo.geometry.kv_heads == 1
    expect(
        ErrorCode.INVALID_ARGUMENT,
        lambda: run(
            h.master.create_namespace(
                pb.NamespaceSpec(name="bad", page_size=0, num_layers=1, segment_bytes=1)
            )
        ),
    )
    names = [s.name for s in run(h.master.list_namespaces())]
    assert names == ["g", "ns"]


def test_delete_namespace_frees_pages_but_waits_for_leases(h: Harness) -> None:
    packed = h.keys(range(8))
    h.commit_all(h.put(packed))
    acq = run(h.master.acquire_prefix("ns", packed[:16]))
    assert run(h.master.delete_namespace("ns")) == 1
    expect(ErrorCode.NAMESPACE_NOT_FOUND, lambda: h.match(packed))
    assert h.master.describe_lease(acq.lease_id).num_pages == 1  # still readable under its lease
    assert len(h.master.index) == 1
    h.master.release_lease(acq.lease_id)
    assert len(h.master.index) == 0
    h.namespace()  # the name can be registered again
    assert h.match(packed) == 0


def test_extras_round_trip_and_lru_budget() -> None:
    h = Harness(extras_budget=1000)
    h.namespace()
    digest = bytes(16)
    run(h.master.put_extra("ns", digest, "tok", b"x" * 100))
    assert run(h.master.get_extra("ns", digest, "tok")) == b"x" * 100
    for i in range(20):
        run(h.master.put_extra("ns", digest, f"e{i}", b"y" * 100))
    expect(ErrorCode.EXTRA_NOT_FOUND, lambda: run(h.master.get_extra("ns", digest, "tok")))
    assert h.master.extras.bytes <= 1000


def test_deferred_commit_answers_before_the_node_holds_it_and_the_last_commit_waits(h: Harness) -> None:
    resp = h.put(h.keys(range(8)))
    h.flush()
    gate = asyncio.Event()
    held: list[pb.SlotUpdates] = []
    plain_send = h.master.notifier._send

    async def slow_node(node: int, msg: pb.SlotUpdates) -> None:
        held.append(msg)
        await gate.wait()
        await plain_send(node, msg)

    h.master.notifier._send = slow_node
    sums = np.arange(2, dtype=np.uint64)

    async def body() -> None:
        # the node has not answered (gate closed), yet the deferred commit is answered
        first = await asyncio.wait_for(
            h.master.commit_layer_durably(resp.session_id, np.array([0]), sums, True), 1.0
        )
        assert first == (0, False)
        # the commit that completes the pages waits for the node, deferred or not
        last = asyncio.ensure_future(
            h.master.commit_layer_durably(resp.session_id, np.array([1]), sums, True)
        )
        await asyncio.sleep(0.05)
        assert held and not last.done()
        gate.set()
        assert await asyncio.wait_for(last, 1.0) == (2, True)

    run(body())
    node = h.master.nodes.by_id["n1"].index
    layers = np.concatenate([np.frombuffer(u.commit_layers, np.uint16) for u in h.updates[node]])
    assert sorted(layers.tolist()) == [0, 0, 1, 1]  # both layers' records reached the node, in order
