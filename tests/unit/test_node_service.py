"""The node's gRPC service (in-process grpc.aio server) and its inventory."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error
from kvstore.node.data_server import DataStats
from kvstore.node.inventory import Inventory
from kvstore.node.service import NodeService
from kvstore.node.state import NodeState
from kvstore.tiers.dram import DramPool

SLOT = 64 << 10
POOL_BYTES = 4 << 20


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def assignments(
    slots: list[int], gens: list[int], term: int = 1, ns: list[int] | None = None
) -> pb.SlotUpdates:
    n = len(slots)
    return pb.SlotUpdates(
        term=term,
        namespaces=["llama/bf16", "other/fp8"],
        assign_slots=np.array(slots, dtype="<u8").tobytes(),
        assign_generations=np.array(gens, dtype="<u4").tobytes(),
        assign_keys=b"".join(key(s // SLOT + 1) for s in slots),
        assign_parents=b"".join(key(s // SLOT) if s else bytes(16) for s in slots),
        assign_slot_bytes=np.full(n, SLOT, dtype="<u8").tobytes(),
        assign_ns_index=np.array(ns or [0] * n, dtype="<u2").tobytes(),
    )


def commits(rows: list[tuple[int, int, int, int, int]], term: int = 1) -> pb.SlotUpdates:
    table = np.array(rows, dtype=np.uint64).reshape(-1, 5)
    return pb.SlotUpdates(
        term=term,
        commit_slots=table[:, 0].astype("<u8").tobytes(),
        commit_layers=table[:, 1].astype("<u2").tobytes(),
        commit_heads=table[:, 2:4].astype("<u2").tobytes(),
        commit_checksums=table[:, 4].astype("<u8").tobytes(),
    )


def frees(slots: list[int], gens: list[int], term: int = 1) -> pb.SlotUpdates:
    return pb.SlotUpdates(
        term=term,
        free_slots=np.array(slots, dtype="<u8").tobytes(),
        free_generations=np.array(gens, dtype="<u4").tobytes(),
    )


class Node:
    def __init__(self, tmp_path) -> None:
        self.pool = DramPool.create(str(tmp_path), "svc", POOL_BYTES, prefault=False)
        self.inventory = Inventory(self.pool.capacity_bytes)
        self.state = NodeState("svc", self.pool.header.incarnation, b"s" * 32)
        self.stats = DataStats()
        self.service = NodeService(self.state, self.pool, self.inventory, self.stats)


async def _serve(node: Node, calls) -> None:
    server = grpc.aio.server()
    pb_grpc.add_NodeServicer_to_server(node.service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await calls(pb_grpc.NodeStub(channel))
    finally:
        await server.stop(0)


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.pool.close()


def run(node: Node, calls) -> None:
    asyncio.run(_serve(node, calls))


async def expect_error(code: ErrorCode, call, match: str = "") -> KVStoreError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = from_rpc_error(info.value)
    assert err.code is code, err
    assert match in err.message
    return err


def test_assign_commit_free_round_trip(node):
    slots = [0, SLOT, 3 * SLOT]

    async def calls(stub: pb_grpc.NodeStub) -> None:
        r = await stub.ApplySlotUpdates(assignments(slots, [5, 6, 7], ns=[0, 1, 0]), timeout=5)
        assert r.applied == 3
        assert node.pool.generation(np.array(slots, dtype=np.uint64)).tolist() == [5, 6, 7]
        assert node.inventory.slot_bytes_of(np.array(slots, dtype=np.uint64)).tolist() == [SLOT] * 3
        r = await stub.ApplySlotUpdates(
            commits([(0, 0, 0, 4, 111), (0, 0, 4, 8, 222), (SLOT, 1, 0, 8, 333)]), timeout=5
        )
        assert r.applied == 3
        stats = await stub.GetStats(pb.NodeStatsRequest(), timeout=5)
        tier = stats.tiers[0]
        assert (stats.node_id, tier.tier, tier.capacity_bytes) == ("svc", "dram", POOL_BYTES)
        assert (tier.used_bytes, tier.slots_in_use) == (3 * SLOT, 3)

        inv = await stub.GetInventory(pb.InventoryRequest(), timeout=5)
        assert inv.node_id == "svc" and inv.incarnation == node.pool.header.incarnation
        s = inv.slots
        got_slots = np.frombuffer(s.assign_slots, dtype="<u8").tolist()
        assert sorted(got_slots) == slots
        order = [got_slots.index(x) for x in slots]
        assert [np.frombuffer(s.assign_generations, dtype="<u4")[i] for i in order] == [5, 6, 7]
        ns_rows = np.frombuffer(s.assign_ns_index, dtype="<u2")
        assert [s.namespaces[ns_rows[i]] for i in order] == ["llama/bf16", "other/fp8", "llama/bf16"]
        assert [s.assign_keys[16 * i : 16 * i + 16] for i in order] == [key(1), key(2), key(4)]
        assert [s.assign_parents[16 * i : 16 * i + 16] for i in order] == [bytes(16), key(1), key(3)]
        rows = sorted(
            zip(
                np.frombuffer(s.commit_slots, dtype="<u8").tolist(),
                np.frombuffer(s.commit_layers, dtype="<u2").tolist(),
                np.frombuffer(s.commit_heads, dtype="<u2").reshape(-1, 2).tolist(),
                np.frombuffer(s.commit_checksums, dtype="<u8").tolist(),
                strict=True,
            )
        )
        assert rows == [(0, 0, [0, 4], 111), (0, 0, [4, 8], 222), (SLOT, 1, [0, 8], 333)]

        r = await stub.ApplySlotUpdates(frees([0, SLOT], [8, 9]), timeout=5)
        assert r.applied == 2
        assert node.pool.generation(np.array(slots, dtype=np.uint64)).tolist() == [8, 9, 7]
        assert node.inventory.slot_bytes_of(np.array(slots, dtype=np.uint64)).tolist() == [0, 0, SLOT]
        tier = (await stub.GetStats(pb.NodeStatsRequest(), timeout=5)).tiers[0]
        assert (tier.used_bytes, tier.slots_in_use) == (SLOT, 1)
        inv = await stub.GetInventory(pb.InventoryRequest(), timeout=5)
        assert np.frombuffer(inv.slots.assign_slots, dtype="<u8").tolist() == [3 * SLOT]
        assert inv.slots.commit_slots == b""

    run(node, calls)


def test_one_batch_applies_assignments_commits_then_frees(node):
    async def calls(stub: pb_grpc.NodeStub) -> None:
        batch = assignments([0, SLOT], [1, 2], term=4)
        batch.MergeFrom(commits([(0, 2, 0, 1, 42), (SLOT, 0, 0, 1, 43)], term=4))
        batch.MergeFrom(frees([SLOT], [3], term=4))
        r = await stub.ApplySlotUpdates(batch, timeout=5)
        assert r.applied == 5
        assert node.pool.generation(np.array([0, SLOT], dtype=np.uint64)).tolist() == [1, 3]
        record = node.inventory.get(0)
        assert record is not None and record.layers == {2: [(0, 1, 42)]}
        assert node.inventory.get(SLOT) is None

    run(node, calls)


def test_retried_batches_are_idempotent(node):
    async def calls(stub: pb_grpc.NodeStub) -> None:
        for _ in range(2):
            await stub.ApplySlotUpdates(assignments([0], [5]), timeout=5)
            await stub.ApplySlotUpdates(commits([(0, 0, 0, 2, 7)]), timeout=5)
        record = node.inventory.get(0)
        assert record is not None and record.layers == {0: [(0, 2, 7)]}
        assert node.inventory.used_bytes == SLOT
        # the same slot assigned at a new generation is a new page: commits start over
        await stub.ApplySlotUpdates(assignments([0], [9]), timeout=5)
        record = node.inventory.get(0)
        assert record is not None and record.layers == {} and record.generation == 9
        assert node.inventory.used_bytes == SLOT
        # freeing twice is harmless
        await stub.ApplySlotUpdates(frees([0], [10]), timeout=5)
        await stub.ApplySlotUpdates(frees([0], [10]), timeout=5)
        assert node.inventory.used_bytes == 0 and len(node.inventory) == 0

    run(node, calls)


def test_updates_from_an_older_term_are_refused(node):
    async def calls(stub: pb_grpc.NodeStub) -> None:
        await stub.ApplySlotUpdates(assignments([0], [5], term=7), timeout=5)
        assert node.state.highest_term == 7
        err = await expect_error(
            ErrorCode.NOT_LEADER, stub.ApplySlotUpdates(frees([0], [6], term=6), timeout=5), match="term 6"
        )
        assert err.status == grpc.StatusCode.FAILED_PRECONDITION
        assert node.pool.generation(np.array([0], dtype=np.uint64)).tolist() == [5]
        assert node.inventory.get(0) is not None
        await stub.ApplySlotUpdates(frees([0], [6], term=8), timeout=5)
        assert node.state.highest_term == 8

    run(node, calls)


def test_malformed_batches_apply_nothing(node):
    async def calls(stub: pb_grpc.NodeStub) -> None:
        bad_tables = assignments([0, SLOT], [1, 2])
        bad_tables.assign_generations = bad_tables.assign_generations[:4]
        bad_keys = assignments([0], [1])
        bad_keys.assign_keys = b"short"
        bad_ns = assignments([0], [1], ns=[5])
        misaligned = assignments([100], [1])
        outside = assignments([POOL_BYTES], [1])
        too_big = assignments([POOL_BYTES - SLOT], [1])
        too_big.assign_slot_bytes = np.array([2 * SLOT], dtype="<u8").tobytes()
        ragged = commits([(0, 0, 0, 1, 1)])
        ragged.commit_heads = b"\0\0\0"
        empty_heads = commits([(0, 0, 3, 3, 1)])
        # a good assignment with a bad free in the same batch: nothing of it applies
        half_bad = assignments([2 * SLOT], [1])
        half_bad.MergeFrom(frees([7], [1]))
        for batch in (
            bad_tables,
            bad_keys,
            bad_ns,
            misaligned,
            outside,
            too_big,
            ragged,
            empty_heads,
            half_bad,
        ):
            await expect_error(ErrorCode.INVALID_ARGUMENT, stub.ApplySlotUpdates(batch, timeout=5))
        assert len(node.inventory) == 0
        assert not node.pool.generations.any()

    run(node, calls)


def test_commit_for_an_unknown_slot_is_skipped(node):
    async def calls(stub: pb_grpc.NodeStub) -> None:
        r = await stub.ApplySlotUpdates(commits([(SLOT, 0, 0, 1, 1)]), timeout=5)
        assert r.applied == 0
        assert len(node.inventory) == 0

    run(node, calls)


def test_stats_report_data_server_counters(node):
    node.stats.add(written=100)
    node.stats.add(read=40, rejected=1)

    async def calls(stub: pb_grpc.NodeStub) -> None:
        tier = (await stub.GetStats(pb.NodeStatsRequest(), timeout=5)).tiers[0]
        assert (tier.bytes_written, tier.bytes_read, tier.grant_rejections) == (100, 40, 1)

    run(node, calls)


def test_inventory_snapshot_of_an_empty_node():
    snap = Inventory(1 << 20).snapshot(term=3)
    assert snap.term == 3 and snap.assign_slots == b"" and snap.commit_slots == b"" and not snap.namespaces
