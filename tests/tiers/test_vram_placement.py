"""Placement of puts into a node's VRAM region, in the master alone (no CUDA needed: a region is a record).

A put that prefers VRAM (a GPU source) lands in the VRAM region of the chosen
node while the region has room below its high watermark, and in DRAM past it;
a put that does not prefer VRAM never lands there.  Placements of VRAM pages
name the region (NodeRef.tier, IPC handle, generation file) and their grants
are bound to it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from kvstore import grants, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import KVStoreError
from kvstore.master.core import Master
from kvstore.testing import master_in_process

MiB = 1 << 20
SLOT = 64 * 1024  # 2 layers x 32 KiB segments
HANDLE = bytes(range(64))


async def make_master(vram_bytes: int = 1 * MiB, **settings: Any) -> Master:
    vram = pb.RegionInfo(
        tier="vram", capacity_bytes=vram_bytes, ipc_handle=HANDLE, device=0, generation_path="/dev/shm/gen"
    )
    master: Master = await master_in_process(
        [pb.RegionInfo(tier="dram", capacity_bytes=4 * MiB), vram], arena_bytes=256 * 1024, **settings
    )
    await master.create_namespace(
        pb.NamespaceSpec(name="ns", page_size=4, num_layers=2, segment_bytes=32 * 1024)
    )
    return master


def packed_keys(master: Master, first_token: int, pages: int) -> bytes:
    tokens = np.arange(first_token, first_token + 4 * pages)
    return keys.pack_keys(keys.page_keys(master.namespaces["ns"].root, tokens, 4))


def tiers_of(master: Master, response: pb.OpenPutResponse) -> list[str]:
    placements = response.placements
    index = np.frombuffer(placements.node_index, dtype="<u2")
    return [placements.nodes[int(i)].tier or "dram" for i in index]


def test_prefer_vram_lands_in_the_region_while_it_is_below_its_high_watermark_then_dram() -> None:
    async def run() -> None:
        # 1 MiB of VRAM holds 16 slots; high watermark 0.5
        master = await make_master(vram_high_watermark=0.5, vram_low_watermark=0.25)
        response = await master.open_put("ns", packed_keys(master, 0, 6), prefer_tier="vram")
        assert tiers_of(master, response) == ["vram"] * 6
        # still below high (6/16): this put goes there too, as far as the region has slots
        response = await master.open_put("ns", packed_keys(master, 100, 12), prefer_tier="vram")
        assert tiers_of(master, response) == ["vram"] * 10 + ["dram"] * 2
        dram, vram = master.nodes.by_id["n1"].regions
        assert vram.allocator.allocated_bytes == 16 * SLOT
        assert dram.allocator.allocated_bytes == 2 * SLOT
        # past its high watermark: the next GPU put goes to DRAM
        response = await master.open_put("ns", packed_keys(master, 1000, 2), prefer_tier="vram")
        assert tiers_of(master, response) == ["dram", "dram"]
        await master.stop()

    asyncio.run(run())


def test_puts_that_do_not_prefer_vram_never_land_there() -> None:
    async def run() -> None:
        master = await make_master()
        for prefer in ("", "dram"):
            response = await master.open_put(
                "ns", packed_keys(master, 100 * len(prefer), 3), prefer_tier=prefer
            )
            assert tiers_of(master, response) == ["dram"] * 3
        assert master.nodes.by_id["n1"].regions[1].allocator.allocated_bytes == 0
        with pytest.raises(KVStoreError, match="prefer_tier"):
            await master.open_put("ns", packed_keys(master, 5000, 1), prefer_tier="nvme")
        await master.stop()

    asyncio.run(run())


def test_vram_placements_name_the_region_and_bind_their_grant_to_it() -> None:
    async def run() -> None:
        master = await make_master()
        packed = packed_keys(master, 0, 2)
        response = await master.open_put("ns", packed, prefer_tier="vram")
        (node,) = response.placements.nodes
        assert (node.tier, node.ipc_handle, node.device) == ("vram", HANDLE, 0)
        assert (node.generation_path, node.region_bytes) == ("/dev/shm/gen", 1 * MiB)
        assert node.pool_path == "/dev/shm/x"  # same host: the DRAM pool's incarnation check still applies
        (grant,) = response.placements.grants
        assert grant.tier == "vram"
        secret = master.grant_secret
        grants.verify(secret, grant, "n1", b"n1".ljust(16, b"."), grants.WRITE)
        forged = pb.Grant()
        forged.CopyFrom(grant)
        forged.tier = ""  # the same slots presented as DRAM slots: the MAC says no
        with pytest.raises(KVStoreError, match="signature"):
            grants.verify(secret, forged, "n1", b"n1".ljust(16, b"."), grants.WRITE)
        # committed pages are read from the region too
        master.commit_layer(response.session_id, np.array([0, 1]), np.arange(4, dtype=np.uint64))
        lease = await master.acquire_prefix("ns", packed)
        assert lease.num_pages == 2
        assert [n.tier for n in lease.placements.nodes] == ["vram"]
        assert lease.placements.grants[0].tier == "vram"
        await master.stop()

    asyncio.run(run())


def test_a_full_vram_region_demotes_to_dram_at_the_watermark_tick() -> None:
    async def run() -> None:
        master = await make_master(vram_high_watermark=0.5, vram_low_watermark=0.25)
        moves: list[pb.MoveSlotsRequest] = []

        class FakeNode:
            async def MoveSlots(self, request: pb.MoveSlotsRequest, **_: Any) -> pb.MoveSlotsResponse:
                moves.append(request)
                return pb.MoveSlotsResponse(ok=b"\x01" * (len(request.src_slots) // 8))

        master.nodes.by_id["n1"].stub = FakeNode()  # type: ignore[assignment]
        packed = packed_keys(master, 0, 8)
        response = await master.open_put("ns", packed, prefer_tier="vram")
        master.commit_layer(response.session_id, np.array([0, 1]), np.arange(16, dtype=np.uint64))
        dram, vram = master.nodes.by_id["n1"].regions
        assert vram.allocator.used_fraction == 0.5  # 8 of 16 slots: at high, past it with one more
        response = await master.open_put("ns", packed_keys(master, 500, 1), prefer_tier="vram")
        assert tiers_of(master, response) == ["dram"]  # not below high any more
        extra, _ = vram.allocator.allocate(SLOT, 1)  # (adoption or a racing put) carries it past high
        assert len(extra) == 1
        master.tiering.tick()
        await asyncio.gather(*master.tiering._busy.values())
        assert moves and moves[0].src_tier == "vram" and moves[0].dst_tier == "dram"
        assert master.tiering.pages_demoted > 0
        await master.stop()

    asyncio.run(run())
