"""Slot allocation inside one node region (DESIGN.md, "Memory, slots and placements").

The region is cut into arenas of ``arena_bytes`` units.  An arena serves one
slot size: a slot no larger than the unit packs ``unit // slot_bytes`` slots
into one unit; a larger slot takes ``ceil(slot_bytes / unit)`` contiguous units
for itself.  Each arena hands out never-used slots from a counter and reused
ones from a small stack, so free slots cost no Python object until they have
been used once.

Every slot has a generation (u32 per 4 KiB unit, as in the pool header table),
bumped on every assignment and every free.  A freed slot is quarantined for
``quarantine_s`` before reuse (a reader whose lease lapsed mid-copy must not
land in someone else's page), and an arena whose slots are all free and out of
quarantine goes back to the region for any slot size.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

GEN_UNIT = 4096
"""Granularity of the generation table (kvstore.tiers.dram.UNIT)."""

Clock = Callable[[], float]


@dataclass
class _Arena:
    first_unit: int
    units: int
    base: int  # byte offset of slot 0
    slot_bytes: int
    slots: int
    fresh: int = 0  # slots [fresh, slots) were never handed out
    reusable: list[int] = field(default_factory=list)  # slot indices back from quarantine
    in_use: int = 0  # allocated + quarantined

    @property
    def available(self) -> int:
        return self.slots - self.fresh + len(self.reusable)

    def take(self, count: int) -> np.ndarray:
        reuse = min(count, len(self.reusable))
        taken = self.reusable[len(self.reusable) - reuse :]
        del self.reusable[len(self.reusable) - reuse :]
        fresh = min(count - reuse, self.slots - self.fresh)
        indices = np.concatenate(
            (np.array(taken, dtype=np.int64), np.arange(self.fresh, self.fresh + fresh, dtype=np.int64))
        )
        self.fresh += fresh
        self.in_use += len(indices)
        return self.base + indices * self.slot_bytes

    def take_index(self, index: int) -> bool:
        """Take slot ``index`` specifically (adoption); False if it is not free."""
        if index >= self.fresh:
            self.reusable.extend(range(self.fresh, index))
            self.fresh = index + 1
        elif index in self.reusable:
            self.reusable.remove(index)
        else:
            return False
        self.in_use += 1
        return True


class RegionAllocator:
    """Allocator of one region (one tier of one node incarnation)."""

    def __init__(
        self,
        capacity_bytes: int,
        arena_bytes: int,
        quarantine_s: float,
        clock: Clock = time.time,
        generation_floor: int = 0,
    ) -> None:
        self.unit = max(GEN_UNIT, min(arena_bytes, capacity_bytes) // GEN_UNIT * GEN_UNIT)
        self.num_units = capacity_bytes // self.unit
        self.capacity = self.num_units * self.unit
        self.quarantine_s = quarantine_s
        self._clock = clock
        # arena owning each unit, named by its first unit (-1: free)
        self._owner = np.full(self.num_units, -1, dtype=np.int64)
        self._arenas: dict[int, _Arena] = {}
        self._arena_slot_bytes = np.zeros(self.num_units, dtype=np.int64)
        # arenas of each slot size that have a slot to give (dict as an ordered set)
        self._open: dict[int, dict[int, None]] = {}
        self.generations = np.full(max(1, self.capacity // GEN_UNIT), generation_floor, dtype=np.uint32)
        # (ready time, slot offsets, their arenas, bytes)
        self._quarantine: deque[tuple[float, np.ndarray, np.ndarray, int]] = deque()
        self.allocated_bytes = 0
        self.quarantined_bytes = 0

    # -- accounting
    @property
    def free_bytes(self) -> int:
        return self.capacity - self.allocated_bytes - self.quarantined_bytes

    @property
    def used_fraction(self) -> float:
        return (self.allocated_bytes + self.quarantined_bytes) / self.capacity if self.capacity else 1.0

    @property
    def arenas(self) -> int:
        return len(self._arenas)

    def free_units(self) -> int:
        return int(np.count_nonzero(self._owner < 0))

    # -- allocation
    def allocate(self, slot_bytes: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``count`` slots of ``slot_bytes``: (offsets u64, generations u32); fewer when the region is full."""
        if slot_bytes <= 0 or slot_bytes % GEN_UNIT:
            raise ValueError(f"slot size {slot_bytes} is not a positive multiple of {GEN_UNIT}")
        self.reclaim()
        parts: list[np.ndarray] = []
        needed = count
        open_arenas = self._open.setdefault(slot_bytes, {})
        while needed > 0:
            arena = self._arenas[next(iter(open_arenas))] if open_arenas else self._carve(slot_bytes)
            if arena is None:
                break
            offsets = arena.take(needed)
            if arena.available == 0:
                open_arenas.pop(arena.first_unit, None)
            parts.append(offsets)
            needed -= len(offsets)
        if not parts:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint32)
        offsets = np.concatenate(parts).astype(np.uint64)
        units = offsets // GEN_UNIT
        self.generations[units] += np.uint32(1)
        self.allocated_bytes += len(offsets) * slot_bytes
        return offsets, self.generations[units].copy()

    def adopt(self, offsets: np.ndarray, slot_bytes: int, generations: np.ndarray) -> np.ndarray:
        """Mark slots another allocator handed out as allocated here (a new leader rebuilding its state).

        Each slot must fit the arena layout this allocator would use for ``slot_bytes``
        (same arena size, as every master of a cluster has), and must not overlap a slot
        already taken.  Returns a bool mask of the slots adopted; their generations
        become ``generations``.  The others are left alone (the caller frees them on the node).
        """
        offsets = np.asarray(offsets, dtype=np.uint64)
        adopted = np.zeros(len(offsets), dtype=bool)
        if slot_bytes <= 0 or slot_bytes % GEN_UNIT:
            return adopted
        units_per_slot = self._units_for(slot_bytes)
        # In offset order, so that each arena's slots are taken upwards (take_index stays O(1)).
        for i in np.argsort(offsets, kind="stable").tolist():
            offset = int(offsets[i])
            first = offset // self.unit
            if (
                offset % GEN_UNIT
                or first + units_per_slot > self.num_units
                or offset + slot_bytes > self.capacity
            ):
                continue
            owner = int(self._owner[first])
            if owner < 0:
                if units_per_slot > 1 and (
                    offset % self.unit or np.any(self._owner[first : first + units_per_slot] >= 0)
                ):
                    continue
                arena = self._carve_at(first, slot_bytes)
            else:
                arena = self._arenas[owner]
                if arena.slot_bytes != slot_bytes:
                    continue
            index, rest = divmod(offset - arena.base, slot_bytes)
            if rest or not 0 <= index < arena.slots or not arena.take_index(index):
                continue
            if arena.available == 0:
                self._open.get(slot_bytes, {}).pop(arena.first_unit, None)
            adopted[i] = True
        taken = offsets[adopted]
        self.generations[taken // GEN_UNIT] = np.asarray(generations, dtype=np.uint32)[adopted]
        self.allocated_bytes += len(taken) * slot_bytes
        return adopted

    def can_allocate(self, slot_bytes: int) -> bool:
        if self._open.get(slot_bytes):
            return True
        return self._find_run(self._units_for(slot_bytes)) >= 0

    def free(self, offsets: np.ndarray, quarantine_s: float | None = None) -> np.ndarray:
        """Free slots: bump their generations (returned) and quarantine them.

        ``quarantine_s`` overrides the region's quarantine (0: reusable at once).
        """
        offsets = np.asarray(offsets, dtype=np.uint64)
        if not len(offsets):
            return np.zeros(0, dtype=np.uint32)
        arenas = self._owner[(offsets // np.uint64(self.unit)).astype(np.int64)]
        if np.any(arenas < 0):
            raise ValueError("free of a slot outside any arena")
        total = int(self._arena_slot_bytes[arenas].sum())
        units = offsets // GEN_UNIT
        self.generations[units] += np.uint32(1)
        self.allocated_bytes -= total
        wait = self.quarantine_s if quarantine_s is None else quarantine_s
        if wait <= 0:
            self._return_slots(offsets, arenas)
        else:
            self.quarantined_bytes += total
            self._quarantine.append((self._clock() + wait, offsets, arenas, total))
        return self.generations[units].copy()

    def reclaim(self, now: float | None = None) -> int:
        """Move slots whose quarantine ended back to their arenas; returns slots reclaimed."""
        now = self._clock() if now is None else now
        reclaimed = 0
        while self._quarantine and self._quarantine[0][0] <= now:
            _, offsets, arenas, total = self._quarantine.popleft()
            self.quarantined_bytes -= total
            reclaimed += len(offsets)
            self._return_slots(offsets, arenas)
        return reclaimed

    def _return_slots(self, offsets: np.ndarray, arenas: np.ndarray) -> None:
        for arena_id in np.unique(arenas).tolist():
            arena = self._arenas[arena_id]
            back = offsets[arenas == arena_id]
            arena.reusable.extend(((back - np.uint64(arena.base)) // np.uint64(arena.slot_bytes)).tolist())
            arena.in_use -= len(back)
            if arena.in_use == 0:
                self._release(arena)
            else:
                self._open.setdefault(arena.slot_bytes, {})[arena_id] = None

    def next_quarantine_end(self) -> float | None:
        return self._quarantine[0][0] if self._quarantine else None

    def generation_of(self, offsets: np.ndarray) -> np.ndarray:
        return self.generations[np.asarray(offsets, dtype=np.uint64) // GEN_UNIT].copy()

    # -- arenas
    def _units_for(self, slot_bytes: int) -> int:
        return -(-slot_bytes // self.unit)

    def _find_run(self, units: int) -> int:
        free = self._owner < 0
        if units == 1:
            hits = np.flatnonzero(free)
            return int(hits[0]) if len(hits) else -1
        if units > self.num_units:
            return -1
        window = np.convolve(free.astype(np.int64), np.ones(units, dtype=np.int64), mode="valid")
        hits = np.flatnonzero(window == units)
        return int(hits[0]) if len(hits) else -1

    def _carve(self, slot_bytes: int) -> _Arena | None:
        first = self._find_run(self._units_for(slot_bytes))
        return None if first < 0 else self._carve_at(first, slot_bytes)

    def _carve_at(self, first: int, slot_bytes: int) -> _Arena:
        units = self._units_for(slot_bytes)
        slots = self.unit // slot_bytes if units == 1 else 1
        arena = _Arena(
            first_unit=first, units=units, base=first * self.unit, slot_bytes=slot_bytes, slots=slots
        )
        self._owner[first : first + units] = first
        self._arena_slot_bytes[first] = slot_bytes
        self._arenas[first] = arena
        self._open.setdefault(slot_bytes, {})[first] = None
        return arena

    def _release(self, arena: _Arena) -> None:
        self._owner[arena.first_unit : arena.first_unit + arena.units] = -1
        self._open.get(arena.slot_bytes, {}).pop(arena.first_unit, None)
        del self._arenas[arena.first_unit]
