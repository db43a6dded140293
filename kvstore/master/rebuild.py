"""Reading a node's inventory back into index form (a new leader rebuilding its state).

A node reports every slot it holds as a SlotUpdates message (kvstore.node.inventory):
assignments (namespace, key, parent, slot size, generation) and the committed
shards of each layer.  Its free table carries one record whose generation is
the highest the region has ever used, so a new leader can number slots above
it.  This module decodes that message with a handful of numpy calls and decides,
per slot, whether the page is complete (every layer has every head committed);
:meth:`kvstore.master.core.Master` then adopts the complete pages and frees the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.keys import KEY_BYTES

_MASK_HEADS = 63  # head ranges up to this many heads are covered with u64 bit masks


@dataclass
class InventoryTable:
    """A node's inventory as parallel arrays; ``well_formed`` False means only slots/generations are usable."""

    slots: np.ndarray  # u64 slot offsets
    generations: np.ndarray  # u32
    keys: np.ndarray  # (n, 16) u8
    parents: np.ndarray  # (n, 16) u8
    slot_bytes: np.ndarray  # u64
    ns_index: np.ndarray  # u16 into namespaces
    namespaces: list[str]
    commit_slots: np.ndarray  # u64
    commit_layers: np.ndarray  # u16
    commit_heads: np.ndarray  # (m, 2) u16
    highest_generation: int
    well_formed: bool

    def __len__(self) -> int:
        return len(self.slots)


def _frombuffer(raw: bytes, dtype: str) -> np.ndarray | None:
    size = np.dtype(dtype).itemsize
    return None if len(raw) % size else np.frombuffer(raw, dtype=dtype)


def parse_inventory(response: pb.InventoryResponse) -> InventoryTable:
    """Decode an inventory; a malformed one keeps just the slots and generations (to be freed)."""
    msg = response.slots
    slots = _frombuffer(msg.assign_slots, "<u8")
    gens = _frombuffer(msg.assign_generations, "<u4")
    if slots is None or gens is None or len(slots) != len(gens):
        n = 0 if slots is None or gens is None else min(len(slots), len(gens))
        slots = (slots if slots is not None else np.zeros(0, "<u8"))[:n]
        gens = (gens if gens is not None else np.zeros(0, "<u4"))[:n]
    n = len(slots)
    free_gens = _frombuffer(msg.free_generations, "<u4")
    highest = int(free_gens.max()) if free_gens is not None and len(free_gens) else 0
    if n:
        highest = max(highest, int(gens.max()))
    sizes = _frombuffer(msg.assign_slot_bytes, "<u8")
    ns_index = _frombuffer(msg.assign_ns_index, "<u2")
    c_slots = _frombuffer(msg.commit_slots, "<u8")
    c_layers = _frombuffer(msg.commit_layers, "<u2")
    c_heads = _frombuffer(msg.commit_heads, "<u2")
    well_formed = (
        sizes is not None
        and ns_index is not None
        and len(sizes) == n
        and len(ns_index) == n
        and len(msg.assign_keys) == n * KEY_BYTES
        and len(msg.assign_parents) == n * KEY_BYTES
        and (n == 0 or int(ns_index.max()) < len(msg.namespaces))
        and c_slots is not None
        and c_layers is not None
        and c_heads is not None
        and len(c_layers) == len(c_slots)
        and len(c_heads) == 2 * len(c_slots)
    )
    if not well_formed:
        empty = np.zeros(0, dtype=np.uint64)
        return InventoryTable(
            slots=slots,
            generations=gens,
            keys=np.zeros((n, KEY_BYTES), np.uint8),
            parents=np.zeros((n, KEY_BYTES), np.uint8),
            slot_bytes=np.zeros(n, np.uint64),
            ns_index=np.zeros(n, np.uint16),
            namespaces=[],
            commit_slots=empty,
            commit_layers=np.zeros(0, np.uint16),
            commit_heads=np.zeros((0, 2), np.uint16),
            highest_generation=highest,
            well_formed=False,
        )
    assert sizes is not None and ns_index is not None
    assert c_slots is not None and c_layers is not None and c_heads is not None
    return InventoryTable(
        slots=slots.astype(np.uint64),
        generations=gens.astype(np.uint32),
        keys=np.frombuffer(msg.assign_keys, np.uint8).reshape(n, KEY_BYTES),
        parents=np.frombuffer(msg.assign_parents, np.uint8).reshape(n, KEY_BYTES),
        slot_bytes=sizes.astype(np.uint64),
        ns_index=ns_index.astype(np.uint16),
        namespaces=list(msg.namespaces),
        commit_slots=c_slots.astype(np.uint64),
        commit_layers=c_layers.astype(np.uint16),
        commit_heads=c_heads.reshape(-1, 2).astype(np.uint16),
        highest_generation=highest,
        well_formed=True,
    )


def complete_pages(
    table: InventoryTable, positions: np.ndarray, num_layers: int, num_heads: int
) -> np.ndarray:
    """For the slots at ``positions`` (one namespace), whether every layer has every head committed."""
    count = len(positions)
    if count == 0 or not len(table.commit_slots):
        return np.zeros(count, dtype=bool)
    slots = table.slots[positions]
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    at = np.searchsorted(sorted_slots, table.commit_slots)
    at_clipped = np.minimum(at, count - 1)
    begin = table.commit_heads[:, 0].astype(np.int64)
    end = table.commit_heads[:, 1].astype(np.int64)
    layer = table.commit_layers.astype(np.int64)
    usable = (
        (at < count)
        & (sorted_slots[at_clipped] == table.commit_slots)
        & (layer < num_layers)
        & (begin < end)
        & (end <= num_heads)
    )
    cell = (order[at_clipped] * num_layers + layer)[usable]  # (page position, layer) of each shard
    begin, end = begin[usable], end[usable]
    if num_heads <= _MASK_HEADS:
        ones = np.uint64(1)
        masks = (np.left_shift(ones, end.astype(np.uint64)) - ones) ^ (
            np.left_shift(ones, begin.astype(np.uint64)) - ones
        )
        cover = np.zeros(count * num_layers, dtype=np.uint64)
        np.bitwise_or.at(cover, cell, masks)
        full = cover == (np.left_shift(ones, np.uint64(num_heads)) - ones)
    else:
        heads = np.arange(num_heads)
        shards = (heads >= begin[:, None]) & (heads < end[:, None])
        cover_heads = np.zeros((count * num_layers, num_heads), dtype=bool)
        np.logical_or.at(cover_heads, cell, shards)
        full = cover_heads.all(axis=1)
    return np.asarray(full.reshape(count, num_layers).all(axis=1))


def first_of_each_key(keys: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct 16-byte key, in their original order."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(np.ascontiguousarray(keys).view("V16").reshape(-1), return_index=True)
    return np.sort(first).astype(np.int64)
