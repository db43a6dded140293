"""A new leader rebuilding its index from node inventories, without processes (issue 3).

The inventories are built by the node's own :class:`kvstore.node.inventory.Inventory`
(the same code a node answers GetInventory with), so master and node agree on the format.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import numpy as np
import pytest

from kvstore import config, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.master.allocator import RegionAllocator
from kvstore.master.core import Master
from kvstore.master.index import COMPLETE, ORPHAN, ROOT
from kvstore.master.rebuild import complete_pages, parse_inventory
from kvstore.metadata.embedded import EmbeddedBackend
from kvstore.node.inventory import Inventory

MiB = 1 << 20
SLOT = 8192  # 2 layers x 4 KiB
_LOOP = asyncio.new_event_loop()


def run(coro: Awaitable[Any]) -> Any:
    return _LOOP.run_until_complete(coro)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeNode:
    """A node's inventory, filled the way ApplySlotUpdates fills it."""

    def __init__(self, capacity: int = 4 * MiB) -> None:
        self.inventory = Inventory(capacity)

    def holds(
        self, slot: int, gen: int, key: bytes, parent: bytes, layers: list[tuple[int, int, int]]
    ) -> None:
        self.inventory.assign(
            np.array([slot], np.uint64),
            np.array([gen], np.uint32),
            key,
            parent,
            np.array([SLOT], np.uint64),
            ["ns"],
        )
        self.inventory.note_generations(np.array([gen], np.uint32))
        for layer, begin, end in layers:
            self.inventory.commit(
                np.array([slot], np.uint64),
                np.array([layer], np.uint16),
                np.array([begin]),
                np.array([end]),
                np.array([layer + 100], np.uint64),
            )

    def response(self) -> pb.InventoryResponse:
        return pb.InventoryResponse(slots=self.inventory.snapshot(1))


def new_leader(term: int, nodes: dict[str, FakeNode], **settings: Any) -> tuple[Master, Clock, list[Any]]:
    """A Master leading with ``term`` (earlier terms led by others) over a namespace "ns"."""
    cfg = config.load(
        {"arena_bytes": 1 * MiB, "write_lease_ms": 2000, "read_lease_ms": 1000, **settings}, environ={}
    )
    backend = EmbeddedBackend()
    run(backend.put_namespace_if_absent("ns", spec().SerializeToString()))
    for _ in range(term - 1):
        run(backend.campaign("old:1"))
        run(backend.resign())
    clock = Clock()
    sent: list[Any] = []

    async def send(node: int, msg: pb.SlotUpdates) -> None:
        sent.append((node, msg))

    master = Master(cfg, backend, clock=clock, sender=send)

    async def inventory(record: Any) -> pb.InventoryResponse:
        return nodes[record.node_id].response()

    master.nodes.inventory = inventory  # type: ignore[method-assign]
    run(master.start("new:1", background=False))
    assert master.term == term
    return master, clock, sent


def spec() -> pb.NamespaceSpec:
    return pb.NamespaceSpec(name="ns", page_size=4, num_layers=2, segment_bytes=4096)


def register(master: Master, node_id: str, incarnation: bytes = b"") -> int:
    run(
        master.register_node(
            pb.RegisterNodeRequest(
                node_id=node_id,
                incarnation=incarnation or node_id.encode().ljust(16, b"."),
                host_id="h",
                control_address="127.0.0.1:1",
                data_address="127.0.0.1:2",
                pool_path="/dev/shm/x",
                regions=[pb.RegionInfo(tier="dram", capacity_bytes=4 * MiB)],
            )
        )
    )
    return master.nodes.by_id[node_id].index


def page_keys(count: int) -> list[bytes]:
    packed = keys.pack_keys(keys.page_keys(keys.namespace_root("ns"), np.arange(4 * count), 4))
    return [packed[i * 16 : (i + 1) * 16] for i in range(count)]


FULL = [(0, 0, 1), (1, 0, 1)]  # both layers, the one head of an opaque namespace
ZERO = bytes(16)


def test_complete_pages_adopted_partial_ones_freed_above_every_generation() -> None:
    k = page_keys(3)
    node = FakeNode()
    node.holds(0, 7, k[0], ZERO, FULL)
    node.holds(SLOT, 9, k[1], k[0], FULL)
    node.holds(2 * SLOT, 4, k[2], k[1], FULL[:1])  # layer 1 never committed
    node.inventory.note_generations(np.array([40], np.uint32))  # a slot freed long ago went up to 40
    master, _, sent = new_leader(2, {"a": node})
    index = register(master, "a")

    packed = b"".join(k)
    assert run(master.match_prefix("ns", packed)) == 2
    rows = master.index.lookup(master.namespaces["ns"].ns_id, packed)
    assert master.index.state[rows[:2]].tolist() == [COMPLETE, COMPLETE] and rows[2] == -1
    assert master.index.generation[rows[:2]].tolist() == [7, 9]  # adopted as they are
    assert master.index.parent[rows[:2]].tolist() == [ROOT, int(rows[0])]
    run(master.notifier.flush_all())
    term_note, frees = [m for n, m in sent if n == index]
    assert term_note.term == 2 and not term_note.assign_slots  # the new term first, alone
    assert np.frombuffer(frees.free_slots, "<u8").tolist() == [2 * SLOT]
    assert np.frombuffer(frees.free_generations, "<u4").tolist() == [41]  # above anything seen
    allocator = master.nodes.by_index[index].allocator
    assert allocator.allocated_bytes == 2 * SLOT and allocator.quarantined_bytes == SLOT


def test_parent_links_are_rebuilt_across_nodes_in_any_order() -> None:
    k = page_keys(2)
    child_node, parent_node = FakeNode(), FakeNode()
    child_node.holds(0, 1, k[1], k[0], FULL)
    parent_node.holds(0, 1, k[0], ZERO, FULL)
    master, _, _ = new_leader(2, {"c": child_node, "p": parent_node})
    register(master, "c")  # the child arrives first: an orphan until its parent is known
    packed = b"".join(k)
    rows = master.index.lookup(master.namespaces["ns"].ns_id, packed)
    assert master.index.parent[rows[1]] == ORPHAN
    register(master, "p")
    rows = master.index.lookup(master.namespaces["ns"].ns_id, packed)
    assert master.index.parent[rows[1]] == rows[0] and master.index.child_count[rows[0]] == 1
    assert run(master.match_prefix("ns", packed)) == 2


def test_a_second_copy_of_a_page_is_freed() -> None:
    k = page_keys(1)
    a, b = FakeNode(), FakeNode()
    a.holds(0, 3, k[0], ZERO, FULL)
    b.holds(SLOT, 5, k[0], ZERO, FULL)
    master, _, sent = new_leader(2, {"a": a, "b": b})
    register(master, "a")
    index_b = register(master, "b")
    run(master.notifier.flush_all())
    frees = [m for n, m in sent if n == index_b and m.free_slots]
    assert len(frees) == 1 and np.frombuffer(frees[0].free_slots, "<u8").tolist() == [SLOT]
    assert len(master.index) == 1


def test_tensor_parallel_shards_make_a_page_complete_only_together() -> None:
    layout_spec = pb.NamespaceSpec(name="g", page_size=4, num_layers=2)
    layout_spec.geometry.CopyFrom(pb.Geometry(kind="mha", kv_heads=4, head_dim=8, dtype="float16"))
    node = FakeNode()
    node.inventory.assign(
        np.array([0, SLOT], np.uint64), np.array([1, 1], np.uint32), b"a" * 16 + b"b" * 16, ZERO * 2,
        np.array([SLOT, SLOT], np.uint64), ["g", "g"],
    )  # fmt: skip
    # slot 0: heads 0-2 and 2-4 of both layers; slot SLOT: layer 1 lacks heads 2-4
    for slot, layer, begin, end in [
        (0, 0, 0, 2),
        (0, 0, 2, 4),
        (0, 1, 2, 4),
        (0, 1, 0, 2),
        (SLOT, 0, 0, 4),
        (SLOT, 1, 0, 2),
    ]:
        node.inventory.commit(
            np.array([slot], np.uint64), np.array([layer], np.uint16), np.array([begin]), np.array([end]),
            np.array([1], np.uint64),
        )  # fmt: skip
    table = parse_inventory(node.response())
    assert complete_pages(table, np.arange(2), num_layers=2, num_heads=4).tolist() == [True, False]
    # a wide model (more heads than one bit mask holds) takes the other path
    many = FakeNode()
    many.inventory.assign(
        np.array([0], np.uint64),
        np.array([1], np.uint32),
        b"c" * 16,
        ZERO,
        np.array([SLOT], np.uint64),
        ["w"],
    )
    for layer in range(2):
        for begin in range(0, 128, 32):
            many.inventory.commit(
                np.array([0], np.uint64), np.array([layer], np.uint16), np.array([begin]), np.array([begin + 32]),
                np.array([1], np.uint64),
            )  # fmt: skip
    wide = parse_inventory(many.response())
    assert complete_pages(wide, np.arange(1), num_layers=2, num_heads=128).tolist() == [True]
    assert complete_pages(wide, np.arange(1), num_layers=3, num_heads=128).tolist() == [False]


def test_a_new_leader_warms_up_before_it_allocates_on_adopted_nodes() -> None:
    k = page_keys(2)
    used, fresh = FakeNode(), FakeNode()
    used.holds(0, 7, k[0], ZERO, FULL)
    master, clock, _ = new_leader(2, {"used": used, "fresh": fresh})
    register(master, "used")
    packed = b"".join(page_keys(3)[1:])
    # reads work at once; a put gets UNAVAILABLE with a retry hint (the first lease period: 2 s)
    assert run(master.match_prefix("ns", b"".join(k[:1]))) == 1
    with pytest.raises(KVStoreError) as err:
        run(master.open_put("ns", packed, parent_key=k[0]))
    assert err.value.code is ErrorCode.UNAVAILABLE and "warming up" in err.value.message
    assert err.value.retry_after_ms == 2000
    # nothing on the warming node is evicted, by request or by admin
    assert master.evict(10 * SLOT) == 0
    assert run(master.admin_evict("", True)) == (0, 1)
    # a node with no history can be used at once
    register(master, "fresh")
    status = np.frombuffer(run(master.open_put("ns", packed, parent_key=k[0])).status, np.uint8)
    assert status.tolist() == [pb.PAGE_NEW, pb.PAGE_NEW]
    clock.now += 2.0
    assert master._warming() == []


def test_the_first_leader_does_not_wait() -> None:
    used = FakeNode()
    used.holds(0, 7, page_keys(1)[0], ZERO, FULL)
    master, _, _ = new_leader(1, {"a": used})
    register(master, "a")
    assert master.nodes.by_id["a"].warm_until == 0.0
    response = run(master.open_put("ns", b"".join(page_keys(2)[1:]), parent_key=page_keys(1)[0]))
    assert np.frombuffer(response.placements.generations, "<u4").tolist() == [9]  # floor 8 (above 7), +1


def test_a_deposed_leader_grants_nothing() -> None:
    used = FakeNode()
    master, _, _ = new_leader(1, {"a": used})
    register(master, "a")
    run(master.metadata.resign())
    for call in (
        lambda: run(master.open_put("ns", page_keys(1)[0])),
        lambda: run(master.acquire_prefix("ns", page_keys(1)[0])),
        lambda: master.commit_layer(1, np.array([0]), np.zeros(0, np.uint64)),
    ):
        with pytest.raises(KVStoreError) as err:
            call()
        assert err.value.code is ErrorCode.NOT_LEADER


def test_allocator_adopts_slots_and_keeps_allocating_around_them() -> None:
    allocator = RegionAllocator(4 * MiB, 1 * MiB, quarantine_s=1.0)
    taken = allocator.adopt(
        np.array([SLOT * 3, 0, 1 * MiB + 4096], np.uint64), SLOT, np.array([5, 6, 7], np.uint32)
    )
    assert taken.tolist() == [True, True, False]  # the last is not on this slot size's grid
    assert allocator.generation_of(np.array([0, SLOT * 3], np.uint64)).tolist() == [6, 5]
    assert not allocator.adopt(np.array([0], np.uint64), SLOT, np.array([9], np.uint32)).any()  # taken
    offsets, _ = allocator.allocate(SLOT, 4)
    assert sorted(offsets.tolist()) == [SLOT, 2 * SLOT, 4 * SLOT, 5 * SLOT]  # around the adopted ones
    assert allocator.allocated_bytes == 6 * SLOT


def test_a_lease_longer_than_the_warm_up_is_recorded_and_waited_out_by_the_successor() -> None:
    cfg = config.load({"arena_bytes": 1 * MiB, "write_lease_ms": 2000, "read_lease_ms": 1000}, environ={})
    backend = EmbeddedBackend()
    run(backend.put_namespace_if_absent("ns", spec().SerializeToString()))
    clock = Clock()

    async def send(node: int, msg: pb.SlotUpdates) -> None:
        return None

    old = Master(cfg, backend, clock=clock, sender=send)
    run(old.start("old:1", background=False))
    # a default-length lease is covered by the successor's warm-up: nothing is written
    run(old._cover_lease(clock() + 1.0))
    assert run(backend.get_value("lease_horizon")) is None
    # a 60 s lease (a client may ask for up to max_lease_ms) is recorded before it is granted
    run(old._cover_lease(clock() + 60.0))
    recorded = run(backend.get_value("lease_horizon"))
    assert recorded is not None
    run(backend.resign())

    used = FakeNode()
    used.holds(0, 7, page_keys(1)[0], ZERO, FULL)
    new = Master(cfg, backend, clock=clock, sender=send)

    async def inventory(record: Any) -> pb.InventoryResponse:
        return used.response()

    new.nodes.inventory = inventory  # type: ignore[method-assign]
    run(new.start("new:1", background=False))
    assert new.term == 2
    register(new, "used")
    warm_for = new.nodes.by_id["used"].warm_until - clock()
    assert 59.0 <= warm_for <= 62.0, warm_for  # the old lease, not just the 2 s default
