"""The NVMe region on its own: sizing, O_DIRECT and its buffered fallback, coalescing, orphans; node moves."""

from __future__ import annotations

import asyncio
import logging
import mmap
import os

import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import KVStoreError
from kvstore.node.inventory import Inventory
from kvstore.node.moves import Mover, Region
from kvstore.node.state import NodeState
from kvstore.tiers import nvme
from kvstore.tiers.dram import DramPool
from kvstore.tiers.nvme import NvmeRegion, coalesce, parse_spec

MiB = 1 << 20


def _buffer(nbytes: int, seed: int) -> tuple[mmap.mmap, np.ndarray]:
    buf = mmap.mmap(-1, nbytes)  # page aligned, as O_DIRECT wants
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return buf, arr


def test_parse_spec() -> None:
    assert parse_spec("64MiB:/tmp/x") == (64 * MiB, "/tmp/x")
    for bad in ("64MiB", "64MiB:", "zero:/tmp", "0:/tmp"):
        with pytest.raises(ValueError):
            parse_spec(bad)


@pytest.mark.parametrize("direct", ["auto", "off"])
def test_roundtrip_of_scattered_slots(tmp_path, direct: str) -> None:
    region = NvmeRegion.create(str(tmp_path), "n1", 16 * MiB, direct=direct, io_threads=3)
    try:
        assert region.direct == (direct == "auto" and region.direct)
        src_buf, src = _buffer(8 * MiB, 1)
        dst_buf, dst = _buffer(8 * MiB, 2)
        sizes = np.array([64 << 10] * 8 + [1 * MiB] * 4, dtype=np.uint64)
        mem = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.uint64)
        slots = np.random.default_rng(3).permutation(np.arange(12, dtype=np.uint64)) * np.uint64(MiB)
        region.write_from(slots, np.uint64(src.ctypes.data) + mem, sizes)
        region.read_into(slots, np.uint64(dst.ctypes.data) + mem, sizes)
        total = int(sizes.sum())
        np.testing.assert_array_equal(src[:total], dst[:total])
        assert region.bytes_written == region.bytes_read == total
        with pytest.raises(KVStoreError):
            region.read_into(
                np.array([16 * MiB], np.uint64), np.array([dst.ctypes.data], np.uint64), sizes[:1]
            )
        del src, dst
        src_buf.close()
        dst_buf.close()
    finally:
        region.close()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(nvme.FILE_PREFIX)]


def test_o_direct_refused_falls_back_to_buffered_io_with_one_log_line(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(nvme, "_open_direct", lambda path: (-1, False, "Invalid argument"))
    with caplog.at_level(logging.WARNING, logger="kvstore.tiers.nvme"):
        region = NvmeRegion.create(str(tmp_path), "n1", 4 * MiB, direct="auto")
    try:
        assert not region.direct
        assert sum("O_DIRECT not available" in r.message for r in caplog.records) == 1
        buf, arr = _buffer(MiB, 5)
        out_buf, out = _buffer(MiB, 6)
        region.write_from(
            np.array([MiB], np.uint64), np.array([arr.ctypes.data], np.uint64), np.array([MiB], np.uint64)
        )
        region.read_into(
            np.array([MiB], np.uint64), np.array([out.ctypes.data], np.uint64), np.array([MiB], np.uint64)
        )
        np.testing.assert_array_equal(arr, out)
        del arr, out
        buf.close()
        out_buf.close()
    finally:
        region.close()
    with pytest.raises(OSError, match="O_DIRECT refused"):
        NvmeRegion.create(str(tmp_path), "n2", 4 * MiB, direct="on")


def test_coalesce_merges_neighbours_and_cuts_long_runs() -> None:
    offsets = np.array([0, 4096, 8192, 65536], dtype=np.uint64)
    addresses = np.array([100_000, 104_096, 108_192, 500_000], dtype=np.uint64)
    lengths = np.full(4, 4096, dtype=np.uint64)
    ops = coalesce(offsets, addresses, lengths)
    assert ops.tolist() == [[0, 100_000, 12288], [65536, 500_000, 4096]]
    long = coalesce(
        np.arange(8, dtype=np.uint64) * 4096,
        np.uint64(1 << 20) + np.arange(8, dtype=np.uint64) * 4096,
        lengths.repeat(2),
        limit=8192,
    )
    assert long[:, 2].tolist() == [8192] * 4


def test_orphaned_region_files_are_swept(tmp_path) -> None:
    orphan = tmp_path / f"{nvme.FILE_PREFIX}dead-node-abc"
    orphan.write_bytes(b"x")
    live = NvmeRegion.create(str(tmp_path), "alive", 1 * MiB)
    try:
        assert not orphan.exists()
        assert nvme.sweep_orphans(str(tmp_path)) == []  # the live one is locked
        assert os.path.exists(live.path)
    finally:
        live.close()


def test_move_slots_between_dram_and_nvme_checks_and_records(tmp_path) -> None:
    """Node side of a demotion and a promotion: bytes, checksums, inventory records and generations."""

    async def run() -> None:
        (tmp_path / "shm").mkdir()
        pool = DramPool.create(str(tmp_path / "shm"), "n1", 4 * MiB, prefault=False)
        region = NvmeRegion.create(str(tmp_path / "nvme"), "n1", 4 * MiB)
        state = NodeState("n1", pool.header.incarnation)
        dram_inv, nvme_inv = Inventory(pool.capacity_bytes), Inventory(region.capacity_bytes)
        mover = Mover(state, {"dram": Region(pool, dram_inv), "nvme": Region(region, nvme_inv)})
        try:
            slot = 256 << 10
            src = np.array([0, slot], dtype=np.uint64)
            gens = np.array([7, 8], dtype=np.uint32)
            dram_inv.assign(src, gens, b"k" * 32, b"p" * 32, np.full(2, slot, np.uint64), ["ns", "ns"])
            pool.set_generation(src, gens)
            dram_inv.commit(
                src,
                np.zeros(2, np.uint16),
                np.zeros(2, np.uint16),
                np.ones(2, np.uint16),
                np.array([11, 12], np.uint64),
            )
            data = np.frombuffer(pool.data_view(), dtype=np.uint8)
            data[: 2 * slot] = np.random.default_rng(9).integers(0, 256, 2 * slot, dtype=np.uint8)
            before = data[: 2 * slot].copy()

            def request(src_tier, dst_tier, s, g, d, dg):
                return pb.MoveSlotsRequest(
                    term=1,
                    src_tier=src_tier,
                    dst_tier=dst_tier,
                    src_slots=s.astype("<u8").tobytes(),
                    src_generations=g.astype("<u4").tobytes(),
                    dst_slots=d.astype("<u8").tobytes(),
                    dst_generations=dg.astype("<u4").tobytes(),
                )

            nvme_slots = np.array([slot * 3, slot * 5], dtype=np.uint64)
            # a stale source generation is refused for that slot only
            bad = await mover.move(
                request(
                    "dram", "nvme", src, np.array([7, 99], np.uint32), nvme_slots, np.array([1, 1], np.uint32)
                )
            )
            assert list(bad.ok) == [1, 0]
            moved = await mover.move(
                request("dram", "nvme", src, gens, nvme_slots, np.array([2, 2], np.uint32))
            )
            assert list(moved.ok) == [1, 1]
            record = nvme_inv.get(int(nvme_slots[1]))
            assert record is not None and record.key == b"k" * 16 and record.generation == 2
            assert record.layers == {0: [(0, 1, 12)]}
            # promotion to other DRAM slots, verified against the checksums taken at demotion
            back = np.array([slot * 8, slot * 9], dtype=np.uint64)
            data[int(back[0]) : int(back[0]) + 2 * slot] = 0
            promoted = await mover.move(
                request(
                    "nvme", "dram", nvme_slots, np.array([2, 2], np.uint32), back, np.array([4, 4], np.uint32)
                )
            )
            assert list(promoted.ok) == [1, 1]
            np.testing.assert_array_equal(data[int(back[0]) : int(back[0]) + 2 * slot], before)
            assert list(pool.generation(back)) == [4, 4]
            # a corrupted NVMe slot fails its checksum on the way back: not ok, never wrong bytes served
            region.checksums[int(nvme_slots[0]) // 4096] ^= 1
            corrupt = await mover.move(
                request(
                    "nvme",
                    "dram",
                    nvme_slots[:1],
                    np.array([2], np.uint32),
                    back[:1] + np.uint64(4 * slot),
                    np.array([5], np.uint32),
                )
            )
            assert list(corrupt.ok) == [0]
            assert dram_inv.get(int(back[0] + np.uint64(4 * slot))) is None
            del data
        finally:
            mover.close()
            region.close()
            pool.close(True)

    asyncio.run(run())
