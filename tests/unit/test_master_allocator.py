"""RegionAllocator: generations, quarantine (injected clock), arenas reused and returned."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.master.allocator import GEN_UNIT, RegionAllocator

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    capacity: int = 16 * MiB, arena: int = 1 * MiB, quarantine: float = 5.0
) -> tuple[RegionAllocator, Clock]:
    clock = Clock()
    return RegionAllocator(capacity, arena, quarantine, clock), clock


def test_slots_are_aligned_distinct_and_start_at_generation_one() -> None:
    alloc, _ = make()
    offsets, gens = alloc.allocate(64 * 1024, 40)
    assert len(offsets) == 40
    assert len(set(offsets.tolist())) == 40
    assert np.all(offsets % GEN_UNIT == 0)
    assert np.all(gens == 1)
    assert alloc.allocated_bytes == 40 * 64 * 1024
    # 16 slots per 1 MiB arena -> 3 arenas
    assert alloc.arenas == 3


def test_generation_bumps_on_free_and_on_reassignment() -> None:
    alloc, clock = make(capacity=1 * MiB, arena=1 * MiB, quarantine=0.0)
    (offset,), (gen,) = alloc.allocate(1 * MiB, 1)
    assert gen == 1
    (freed_gen,) = alloc.free(np.array([offset]))
    assert freed_gen == 2
    (again,), (gen2,) = alloc.allocate(1 * MiB, 1)
    assert again == offset and gen2 == 3


def test_quarantine_holds_freed_slots_until_it_ends() -> None:
    alloc, clock = make(capacity=1 * MiB, arena=1 * MiB, quarantine=5.0)
    offsets, _ = alloc.allocate(256 * 1024, 4)
    assert len(alloc.allocate(256 * 1024, 1)[0]) == 0  # full
    alloc.free(offsets[:1])
    assert alloc.quarantined_bytes == 256 * 1024
    clock.now += 4.9
    assert len(alloc.allocate(256 * 1024, 1)[0]) == 0, "reused inside the quarantine"
    clock.now += 0.2
    got, gens = alloc.allocate(256 * 1024, 1)
    assert got.tolist() == offsets[:1].tolist()
    assert gens[0] == 3
    assert alloc.quarantined_bytes == 0


def test_fully_free_arena_goes_back_to_the_region_for_another_size() -> None:
    alloc, clock = make(capacity=2 * MiB, arena=1 * MiB, quarantine=1.0)
    small, _ = alloc.allocate(64 * 1024, 32)  # both arenas carved for 64 KiB
    assert alloc.arenas == 2 and alloc.free_units() == 0
    assert len(alloc.allocate(1 * MiB, 1)[0]) == 0
    alloc.free(small[:16])  # empties the first arena, but it is quarantined
    assert len(alloc.allocate(1 * MiB, 1)[0]) == 0
    clock.now += 1.0
    big, gens = alloc.allocate(1 * MiB, 1)
    assert len(big) == 1 and alloc.arenas == 2
    # a generation never goes back: the unit's counter continues from the small slot's
    assert gens[0] == 3


def test_slots_larger_than_an_arena_take_contiguous_units() -> None:
    alloc, clock = make(capacity=8 * MiB, arena=1 * MiB, quarantine=0.0)
    offsets, _ = alloc.allocate(3 * MiB, 3)
    assert len(offsets) == 2  # 8 units hold two 3-unit slots
    assert sorted(offsets.tolist()) == [0, 3 * MiB]
    alloc.free(offsets[:1])
    alloc.reclaim()
    assert alloc.free_units() == 5
    more, _ = alloc.allocate(3 * MiB, 1)
    assert more.tolist() == [0]


def test_region_smaller_than_an_arena_still_allocates() -> None:
    alloc, _ = make(capacity=256 * 1024, arena=16 * MiB)
    offsets, _ = alloc.allocate(64 * 1024, 10)
    assert len(offsets) == 4


def test_accounting_and_bad_sizes() -> None:
    alloc, clock = make(capacity=4 * MiB, arena=1 * MiB, quarantine=2.0)
    offsets, _ = alloc.allocate(128 * 1024, 10)
    alloc.free(offsets[:4])
    assert alloc.allocated_bytes == 6 * 128 * 1024
    assert alloc.quarantined_bytes == 4 * 128 * 1024
    assert alloc.free_bytes == alloc.capacity - 10 * 128 * 1024
    clock.now += 2.0
    assert alloc.reclaim() == 4
    assert alloc.quarantined_bytes == 0
    with pytest.raises(ValueError):
        alloc.allocate(1000, 1)


def test_generation_floor() -> None:
    alloc = RegionAllocator(1 * MiB, 1 * MiB, 0.0, Clock(), generation_floor=41)
    _, gens = alloc.allocate(64 * 1024, 2)
    assert gens.tolist() == [42, 42]


def test_free_without_quarantine_is_reusable_at_once_with_a_new_generation() -> None:
    alloc, clock = make(capacity=1 * MiB, arena=1 * MiB)
    offsets, gens = alloc.allocate(64 * 1024, 16)
    assert len(alloc.allocate(64 * 1024, 1)[0]) == 0  # full
    freed_gens = alloc.free(offsets[:2], quarantine_s=0)
    assert np.all(freed_gens == gens[:2] + 1)
    assert alloc.quarantined_bytes == 0
    again, again_gens = alloc.allocate(64 * 1024, 2)
    assert sorted(again.tolist()) == sorted(offsets[:2].tolist())
    assert np.all(again_gens == gens[:2] + 2)
    # the default quarantine still applies to other frees
    alloc.free(offsets[2:3])
    assert len(alloc.allocate(64 * 1024, 1)[0]) == 0
    clock.now += 5.0
    assert len(alloc.allocate(64 * 1024, 1)[0]) == 1
