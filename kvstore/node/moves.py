"""Tier moves on the node: whole slots copied between regions on the master's order.

The master decides (kvstore.master.tiering); the node copies, verifies and
records:

* ``MoveSlots``: between two regions of this node (DRAM -> NVMe demotion,
  NVMe -> DRAM promotion, VRAM <-> DRAM).  One request is one batched
  operation: one native hash call and a few coalesced file requests spread
  over the NVMe region's threads, never a call per segment.
* ``PullSlots``: from another node's DRAM pool over its TCP data server
  (drain), with a READ grant the master signed; every range is checked
  against the hash the sending server computed as it sent it.
* ``DescribeSlots``: the inventory records of some slots (what a copy
  elsewhere needs to be rebuilt from).

Checks run on the event loop, bytes move in a worker thread (GIL released),
and the destination records are written back on the loop: assignment (same
namespace, key and parent; the new generation), generation published, then
the source's layer commits.  The source slots stay as they are; the master
frees them with an ordinary slot update after it switched the placement, so a
leader rebuilt in between finds the page twice and keeps one copy.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from kvstore import native
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.node.inventory import KEY_BYTES, Inventory
from kvstore.node.state import NodeState
from kvstore.packed import unpack
from kvstore.tiers.base import SLOT_UNIT, Tier
from kvstore.transports.tcp import ConnectionPool, TcpTransport, _chunks

log = logging.getLogger("kvstore.node.moves")


@dataclass
class Region:
    """One region of this node: its bytes and what its slots hold."""

    tier: Tier
    inventory: Inventory


def _check_pairs(src_slots: np.ndarray, dst_slots: np.ndarray, dst_gens: np.ndarray) -> None:
    if not (len(src_slots) == len(dst_slots) == len(dst_gens)):
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT,
            f"slot tables have different lengths ({len(src_slots)}, {len(dst_slots)}, {len(dst_gens)})",
        )
    if len(np.unique(src_slots)) != len(src_slots) or len(np.unique(dst_slots)) != len(dst_slots):
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "a slot is named twice in one move")


class Mover:
    """Executes MoveSlots / PullSlots / DescribeSlots against this node's regions."""

    def __init__(
        self, state: NodeState, regions: dict[str, Region], copy_threads: int = 1, timeout_s: float = 30.0
    ) -> None:
        self._state = state
        self.regions = regions
        self._threads = max(1, copy_threads)
        self._connections = ConnectionPool(timeout_s)
        self._tcp = TcpTransport(self._connections)
        self.moves = 0
        self.bytes_moved = 0
        self.verify_failures = 0

    def close(self) -> None:
        self._tcp.close()

    def region(self, tier: str) -> Region:
        region = self.regions.get(tier or "dram")
        if region is None:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"this node has no {tier!r} region (it has {', '.join(sorted(self.regions))})",
            )
        return region

    # -- MoveSlots
    async def move(self, request: pb.MoveSlotsRequest) -> pb.MoveSlotsResponse:
        src, dst = self.region(request.src_tier), self.region(request.dst_tier)
        if src is dst:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "source and destination are the same region")
        src_slots = unpack(request.src_slots, "<u8", "src_slots")
        src_gens = unpack(request.src_generations, "<u4", "src_generations")
        dst_slots = unpack(request.dst_slots, "<u8", "dst_slots")
        dst_gens = unpack(request.dst_generations, "<u4", "dst_generations")
        _check_pairs(src_slots, dst_slots, dst_gens)
        if len(src_gens) != len(src_slots):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "src_generations: one per source slot")
        src.inventory.check_slots(src_slots, "move source")
        dst.inventory.check_slots(dst_slots, "move destination")
        self._state.observe_term(request.term)

        sizes = src.inventory.slot_bytes_of(src_slots)
        ok = (sizes > 0) & (src.tier.generation(src_slots) == src_gens)
        ok &= dst_slots + sizes <= np.uint64(dst.tier.capacity_bytes)
        why = "" if ok.all() else "source slot not held at that generation, or destination out of range"
        pick = np.flatnonzero(ok)
        if len(pick):
            try:
                verified = await asyncio.to_thread(
                    self._copy, src, dst, src_slots[pick], dst_slots[pick], sizes[pick]
                )
            except (OSError, KVStoreError) as exc:
                log.warning(
                    "move %s -> %s of %d slots failed: %s", src.tier.tier, dst.tier.tier, len(pick), exc
                )
                verified = np.zeros(len(pick), dtype=bool)
                why = why or str(exc)
            if not verified.all():
                self.verify_failures += int(np.count_nonzero(~verified))
                why = why or "checksum mismatch after the copy"
            ok[pick] = verified
        records = src.inventory.describe(src_slots[ok])
        ok &= self._record(dst, records, src_slots, dst_slots, dst_gens)
        moved = int(sizes[ok].sum())
        self.moves += int(np.count_nonzero(ok))
        self.bytes_moved += moved
        return pb.MoveSlotsResponse(ok=ok.astype(np.uint8).tobytes(), message=why, bytes_moved=moved)

    def _copy(
        self, src: Region, dst: Region, src_slots: np.ndarray, dst_slots: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray:
        """Copy whole slots (worker thread); returns which were verified."""
        kinds = (src.tier.tier, dst.tier.tier)
        if kinds == ("dram", "nvme"):
            addresses = np.uint64(src.tier.data_address) + src_slots
            sums = native.hash_ranges(np.stack((addresses, sizes), axis=1), self._threads)
            dst.tier.write_from(dst_slots, addresses, sizes)  # type: ignore[attr-defined]
            dst.tier.remember(dst_slots, sums)  # type: ignore[attr-defined]
            return np.ones(len(src_slots), dtype=bool)
        if kinds == ("nvme", "dram"):
            addresses = np.uint64(dst.tier.data_address) + dst_slots
            src.tier.read_into(src_slots, addresses, sizes)  # type: ignore[attr-defined]
            sums = native.hash_ranges(np.stack((addresses, sizes), axis=1), self._threads)
            good = src.tier.verify(src_slots, sums)  # type: ignore[attr-defined]
            if not good.all():
                log.warning(
                    "%d slots read back from NVMe failed their checksum", int(np.count_nonzero(~good))
                )
            return np.asarray(good)
        if kinds == ("vram", "dram"):
            addresses = np.uint64(dst.tier.data_address) + dst_slots
            # one kernel launch for every slot of the request (the pool registered with CUDA once)
            src.tier.copy_to_host(src_slots, addresses, sizes, _host_span(dst.tier))  # type: ignore[attr-defined]
            sums = native.hash_ranges(np.stack((addresses, sizes), axis=1), self._threads)
            return np.asarray(src.tier.verify(src_slots, sums))  # type: ignore[attr-defined]
        if kinds == ("dram", "vram"):
            addresses = np.uint64(src.tier.data_address) + src_slots
            sums = native.hash_ranges(np.stack((addresses, sizes), axis=1), self._threads)
            dst.tier.copy_from_host(dst_slots, addresses, sizes, _host_span(src.tier))  # type: ignore[attr-defined]
            dst.tier.remember(dst_slots, sums)  # type: ignore[attr-defined]
            return np.ones(len(src_slots), dtype=bool)
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"no move from {kinds[0]} to {kinds[1]}")

    # -- PullSlots
    async def pull(self, request: pb.PullSlotsRequest) -> pb.MoveSlotsResponse:
        dst = self.region(request.dst_tier)
        if not dst.tier.data_address:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"cannot pull into the {dst.tier.tier} region")
        if not request.source.data_address or not request.HasField("grant"):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "source.data_address and grant are required")
        src_slots = unpack(request.src_slots, "<u8", "src_slots")
        dst_slots = unpack(request.dst_slots, "<u8", "dst_slots")
        dst_gens = unpack(request.dst_generations, "<u4", "dst_generations")
        _check_pairs(src_slots, dst_slots, dst_gens)
        dst.inventory.check_slots(dst_slots, "pull destination")
        self._state.observe_term(request.term)

        # sizes come from the source's records: a slot without one is not pulled
        rec_slots = unpack(request.records.assign_slots, "<u8", "records.assign_slots")
        rec_sizes = unpack(request.records.assign_slot_bytes, "<u8", "records.assign_slot_bytes")
        if len(rec_slots) != len(rec_sizes):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "records: one slot size per assignment")
        at = _positions(rec_slots, src_slots)
        ok = at >= 0
        sizes = np.zeros(len(src_slots), dtype=np.uint64)
        sizes[ok] = rec_sizes[at[ok]]
        ok &= (
            (sizes > 0) & (sizes % SLOT_UNIT == 0) & (dst_slots + sizes <= np.uint64(dst.tier.capacity_bytes))
        )
        why = "" if ok.all() else "no record for a source slot, or destination out of range"
        pick = np.flatnonzero(ok)
        if len(pick):
            ops = np.stack(
                (src_slots[pick], np.zeros(len(pick), dtype=np.uint64), sizes[pick]), axis=1
            ).astype(np.uint64)
            ranges = np.stack((np.uint64(dst.tier.data_address) + dst_slots[pick], sizes[pick]), axis=1)
            try:
                bad = await asyncio.to_thread(
                    self._pull_bytes,
                    request.source.data_address,
                    request.grant.SerializeToString(),
                    ops,
                    ranges,
                )
            except (OSError, KVStoreError) as exc:
                log.warning("pull of %d slots from %s failed: %s", len(pick), request.source.node_id, exc)
                bad = np.ones(len(pick), dtype=bool)
                why = why or str(exc)
            if bad.any():
                why = why or "data failed its checksum or the source slot changed during the copy"
            ok[pick] = ~bad
        ok &= self._record(dst, _only(request.records, src_slots[ok]), src_slots, dst_slots, dst_gens)
        moved = int(sizes[ok].sum())
        self.moves += int(np.count_nonzero(ok))
        self.bytes_moved += moved
        return pb.MoveSlotsResponse(ok=ok.astype(np.uint8).tobytes(), message=why, bytes_moved=moved)

    def _pull_bytes(self, address: str, grant: bytes, ops: np.ndarray, ranges: np.ndarray) -> np.ndarray:
        bad = np.zeros(len(ops), dtype=bool)
        for lo, hi in _chunks(ops[:, 2]):
            bad[lo:hi] = self._tcp._read_request(address, grant, ops[lo:hi], ranges[lo:hi])
        return bad

    # -- DescribeSlots
    def describe(self, request: pb.DescribeSlotsRequest) -> pb.SlotUpdates:
        region = self.region(request.tier)
        slots = unpack(request.slots, "<u8", "slots")
        msg = region.inventory.describe(slots, self._state.highest_term)
        msg.tier = region.tier.tier
        return msg

    # -- records
    def _record(
        self,
        dst: Region,
        records: pb.SlotUpdates,
        src_slots: np.ndarray,
        dst_slots: np.ndarray,
        dst_gens: np.ndarray,
    ) -> np.ndarray:
        """Record ``records`` (source slot offsets) as the destination slots; returns which source slots were."""
        a_slots = unpack(records.assign_slots, "<u8", "records.assign_slots")
        done = np.zeros(len(src_slots), dtype=bool)
        if not len(a_slots):
            return done
        a_gens_src = unpack(records.assign_generations, "<u4", "records.assign_generations")
        a_sizes = unpack(records.assign_slot_bytes, "<u8", "records.assign_slot_bytes")
        a_ns = unpack(records.assign_ns_index, "<u2", "records.assign_ns_index")
        if (
            not (len(a_gens_src) == len(a_sizes) == len(a_ns) == len(a_slots))
            or len(records.assign_keys) != len(a_slots) * KEY_BYTES
            or len(records.assign_parents) != len(a_slots) * KEY_BYTES
            or (len(a_ns) and int(a_ns.max()) >= len(records.namespaces))
        ):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "records: malformed assignment table")
        at = _positions(src_slots, a_slots)  # position in the request of each record
        keep = at >= 0
        at = at[keep]
        keys = np.frombuffer(records.assign_keys, dtype=np.uint8).reshape(-1, KEY_BYTES)[keep]
        parents = np.frombuffer(records.assign_parents, dtype=np.uint8).reshape(-1, KEY_BYTES)[keep]
        names = list(records.namespaces)
        new_slots = dst_slots[at]
        new_gens = dst_gens[at]
        dst.inventory.assign(
            new_slots,
            new_gens,
            keys.tobytes(),
            parents.tobytes(),
            a_sizes[keep],
            [names[i] for i in a_ns[keep].tolist()],
        )
        dst.tier.set_generation(new_slots, new_gens)
        dst.inventory.note_generations(new_gens)
        c_slots = unpack(records.commit_slots, "<u8", "records.commit_slots")
        c_layers = unpack(records.commit_layers, "<u2", "records.commit_layers")
        c_heads = unpack(records.commit_heads, "<u2", "records.commit_heads").reshape(-1, 2)
        c_sums = unpack(records.commit_checksums, "<u8", "records.commit_checksums")
        if not (len(c_slots) == len(c_layers) == len(c_heads) == len(c_sums)):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "records: malformed commit table")
        done[at] = True
        c_at = _positions(src_slots, c_slots)
        c_keep = c_at >= 0
        c_keep[c_keep] = done[c_at[c_keep]]  # only the shards of slots recorded just now
        dst.inventory.commit(
            dst_slots[c_at[c_keep]],
            c_layers[c_keep],
            c_heads[c_keep, 0],
            c_heads[c_keep, 1],
            c_sums[c_keep],
        )
        return done


def _host_span(tier: object) -> tuple[int, int] | None:
    """(base address, bytes) of a host tier's whole mapping (a DRAM pool), for one-launch VRAM moves."""
    base, data = getattr(tier, "base_address", None), getattr(tier, "bytes", None)
    return (int(base), len(data)) if base is not None and data is not None else None


def _positions(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index in ``table`` of each of ``values`` (-1 where absent); ``table`` has distinct entries."""
    if not len(table) or not len(values):
        return np.full(len(values), -1, dtype=np.int64)
    order = np.argsort(table, kind="stable")
    sorted_table = table[order]
    pos = np.minimum(np.searchsorted(sorted_table, values), len(table) - 1)
    return np.where(sorted_table[pos] == values, order[pos], -1).astype(np.int64)


def _only(records: pb.SlotUpdates, slots: np.ndarray) -> pb.SlotUpdates:
    """``records`` restricted to ``slots`` (the ones whose bytes arrived)."""
    a_slots = unpack(records.assign_slots, "<u8", "records.assign_slots")
    keep = _positions(slots, a_slots) >= 0 if len(slots) else np.zeros(len(a_slots), dtype=bool)
    out = pb.SlotUpdates(namespaces=records.namespaces)
    out.assign_slots = a_slots[keep].tobytes()
    for name, dtype, width in (
        ("assign_generations", "<u4", 1),
        ("assign_slot_bytes", "<u8", 1),
        ("assign_ns_index", "<u2", 1),
        ("assign_keys", "u1", KEY_BYTES),
        ("assign_parents", "u1", KEY_BYTES),
    ):
        table = unpack(getattr(records, name), dtype, name)
        if len(table) != len(a_slots) * width:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"records: {name} has the wrong length")
        setattr(out, name, table.reshape(len(a_slots), width)[keep].tobytes())
    out.commit_slots = records.commit_slots
    out.commit_layers = records.commit_layers
    out.commit_heads = records.commit_heads
    out.commit_checksums = records.commit_checksums
    return out
