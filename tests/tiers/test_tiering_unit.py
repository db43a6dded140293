"""The master's tier logic without processes: moves, the atomic switch, leases during a move, promotion."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from kvstore import keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import KVStoreError
from kvstore.master.core import Master
from kvstore.master.index import COMPLETE
from kvstore.master.tiering import LruDemotion, make_policy
from kvstore.testing import master_in_process

MiB = 1 << 20


class FakeNode:
    """The Node stub of one node process: MoveSlots succeeds, after ``gate`` if one is set."""

    def __init__(self) -> None:
        self.moves: list[pb.MoveSlotsRequest] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def MoveSlots(self, request: pb.MoveSlotsRequest, **_: Any) -> pb.MoveSlotsResponse:  # timeout=
        self.moves.append(request)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        count = len(request.src_slots) // 8
        return pb.MoveSlotsResponse(ok=b"\x01" * count)


async def make_master(**settings: Any) -> tuple[Master, FakeNode, list[tuple[int, pb.SlotUpdates]]]:
    sent: list[tuple[int, pb.SlotUpdates]] = []

    async def send(node: int, msg: pb.SlotUpdates) -> None:
        sent.append((node, msg))

    master = await master_in_process(
        [
            pb.RegionInfo(tier="dram", capacity_bytes=4 * MiB),
            pb.RegionInfo(tier="nvme", capacity_bytes=8 * MiB),
        ],
        sender=send,
        **settings,
    )
    fake = FakeNode()
    master.nodes.by_id["n1"].stub = fake  # type: ignore[assignment]
    await master.create_namespace(
        pb.NamespaceSpec(name="ns", page_size=4, num_layers=2, segment_bytes=32 * 1024)
    )
    return master, fake, sent


async def put(master: Master, tokens: np.ndarray) -> bytes:
    ns = master.namespaces["ns"]
    packed = keys.pack_keys(keys.page_keys(ns.root, tokens, 4))
    resp = await master.open_put("ns", packed)
    pages = len(packed) // 16
    for layer in range(2):
        master.commit_layer(resp.session_id, np.array([layer]), np.arange(pages, dtype=np.uint64))
    return packed


def test_register_validates_regions() -> None:
    async def run() -> None:
        master, _, _ = await make_master()
        bad = [
            [pb.RegionInfo(tier="nvme", capacity_bytes=MiB)],
            [pb.RegionInfo(tier="dram", capacity_bytes=MiB), pb.RegionInfo(tier="dram", capacity_bytes=MiB)],
            [pb.RegionInfo(tier="dram", capacity_bytes=MiB), pb.RegionInfo(tier="tape", capacity_bytes=MiB)],
            [pb.RegionInfo(tier="dram", capacity_bytes=MiB), pb.RegionInfo(tier="nvme", capacity_bytes=10)],
        ]
        for regions in bad:
            with pytest.raises(KVStoreError):
                await master.register_node(
                    pb.RegisterNodeRequest(
                        node_id="x",
                        incarnation=b"x" * 16,
                        control_address="a:1",
                        data_address="a:2",
                        regions=regions,
                    )
                )
        record = master.nodes.by_id["n1"]
        assert [r.tier for r in record.regions] == ["dram", "nvme"]
        assert [s.tier for s in master.node_statuses()[0].tiers] == ["dram", "nvme"]
        await master.stop()

    asyncio.run(run())


def test_demotion_switches_placements_but_a_lease_taken_meanwhile_keeps_the_old_slot() -> None:
    async def run() -> None:
        master, fake, sent = await make_master()
        index = master.index
        dram, nvme = master.nodes.by_id["n1"].regions
        a = await put(master, np.arange(8))  # 2 pages
        b = await put(master, np.arange(100, 108))  # 2 pages
        rows_a = index.lookup(master.namespaces["ns"].ns_id, a)
        rows_b = index.lookup(master.namespaces["ns"].ns_id, b)
        old_slots_a = index.slot[rows_a].copy()
        fake.gate = asyncio.Event()
        move = asyncio.ensure_future(master.tiering.transfer(dram, nvme, np.concatenate((rows_a, rows_b))))
        await fake.entered.wait()
        assert index.lease_count[rows_a].tolist() == [1, 1]  # held by the move: not evictable, not movable
        lease = await master.acquire_prefix("ns", a)  # a reader leases prefix a mid-copy
        assert lease.num_pages == 2
        fake.gate.set()
        moved = await move
        assert moved == 2
        assert (index.node[rows_a] == dram.index).all() and (index.slot[rows_a] == old_slots_a).all()
        assert (index.node[rows_b] == nvme.index).all()
        assert dram.demotions == 2
        # the copies of the leased pages were freed on the NVMe region, the demoted pages' DRAM slots freed
        await master.notifier.flush_all()
        freed_nvme = [m for n, m in sent if n == nvme.index and m.free_slots]
        assert freed_nvme  # (NodeRegistry.send_updates labels them tier="nvme" on the wire)
        # a read of prefix b promotes it back (NVMe pages are never handed out)
        described = await master.acquire_prefix("ns", b)
        assert described.num_pages == 2
        assert (index.node[rows_b] == dram.index).all()
        assert fake.moves[-1].src_tier == "nvme" and fake.moves[-1].dst_tier == "dram"
        assert dram.promotions == 2
        master.release_lease(lease.lease_id)
        master.release_lease(described.lease_id)
        assert index.lease_count[np.concatenate((rows_a, rows_b))].tolist() == [0, 0, 0, 0]
        await master.stop()

    asyncio.run(run())


def test_without_promotion_the_hit_ends_at_the_first_nvme_page() -> None:
    async def run() -> None:
        master, _, _ = await make_master(promote_on_hit=False)
        dram, nvme = master.nodes.by_id["n1"].regions
        packed = await put(master, np.arange(12))  # 3 pages
        rows = master.index.lookup(master.namespaces["ns"].ns_id, packed)
        assert await master.tiering.transfer(dram, nvme, rows[1:2]) == 1
        assert await master.match_prefix("ns", packed) == 3  # matching counts NVMe pages
        lease = await master.acquire_prefix("ns", packed)
        assert lease.num_pages == 1
        placements = master._placements(rows, 64 * 1024, 1, 0.0)
        assert np.frombuffer(placements.node_index, "<u2")[1] == 0xFFFF  # never an NVMe placement
        await master.stop()

    asyncio.run(run())


def test_lru_demotion_policy_order_and_exclusions() -> None:
    async def run() -> None:
        master, _, _ = await make_master()
        dram = master.nodes.by_id["n1"]
        index = master.index
        packed = await put(master, np.arange(16))  # 4 pages
        rows = index.lookup(master.namespaces["ns"].ns_id, packed)
        index.last_access[rows] = [5.0, 1.0, 3.0, 2.0]
        now = master.clock()
        policy = LruDemotion()
        slot = int(index.row_bytes(rows[:1])[0])
        assert policy.demotion_candidates(index, dram.index, 2 * slot, now, 10).tolist() == [rows[1], rows[3]]
        index.pin_until[rows[1]] = now + 10
        index.lease_count[rows[3]] = 1
        got = policy.demotion_candidates(index, dram.index, 10 * slot, now, 10, exclude=rows[:1])
        assert got.tolist() == [rows[2]]
        assert (index.state[rows] == COMPLETE).all()
        index.lease_count[rows[3]] = 0
        with pytest.raises(KVStoreError):
            make_policy("mru")
        await master.stop()

    asyncio.run(run())
