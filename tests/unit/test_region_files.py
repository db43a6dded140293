"""Region files other processes attach (a VRAM region's generation table) and moved slots' checksums.

No GPU needed: the generation file is shared memory, and the checksum rules are plain numpy.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvstore import native
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.base import SLOT_UNIT, SlotChecksums
from kvstore.tiers.vram import GenerationFile


def test_generation_file_attaches_only_for_its_incarnation(tmp_path) -> None:
    owner = GenerationFile.create(str(tmp_path), "n1", b"i" * 16, 64 * SLOT_UNIT)
    try:
        owner.table[3] = 7
        reader = GenerationFile.attach(owner.path, b"i" * 16)
        assert reader.generation(np.array([3 * SLOT_UNIT], dtype=np.uint64)).tolist() == [7]
        reader.close(unlink=False)
        with pytest.raises(KVStoreError) as info:
            GenerationFile.attach(owner.path, b"j" * 16)
        assert info.value.code is ErrorCode.STALE_INCARNATION
        with pytest.raises(KVStoreError) as info:
            GenerationFile.attach(os.path.join(str(tmp_path), "absent"), b"i" * 16)
        assert info.value.code is ErrorCode.STALE_INCARNATION
        truncated = tmp_path / "short"
        truncated.write_bytes(b"x" * 8)
        with pytest.raises(KVStoreError) as info:
            GenerationFile.attach(str(truncated), b"i" * 16)
        assert info.value.code is ErrorCode.STALE_INCARNATION and "truncated" in info.value.message
    finally:
        owner.close()


class _Strict(SlotChecksums):
    def __init__(self) -> None:
        self._init_checksums(8 * SLOT_UNIT)


class _Lenient(_Strict):
    UNKNOWN_PASSES = True


@pytest.mark.parametrize(("kind", "unknown_ok"), [(_Strict, False), (_Lenient, True)])
def test_moved_slots_verify_against_what_was_remembered(kind, unknown_ok) -> None:
    region = kind()
    slots = np.array([0, 2 * SLOT_UNIT, 5 * SLOT_UNIT], dtype=np.uint64)
    region.remember(slots[:2], np.array([11, 22], dtype=np.uint64))
    got = region.verify(slots, np.array([11, 23, 99], dtype=np.uint64))
    assert got.tolist() == [True, False, unknown_ok]  # a match, a mismatch, a slot never remembered


def test_first_moved_finds_the_first_slot_whose_generation_changed() -> None:
    table = np.arange(64, dtype=np.uint32)
    units = np.array([3, 9, 9, 40, 63], dtype=np.int64)
    assert native.first_moved(table, units, table[units]) == -1
    moved = table.copy()
    moved[40] += 1
    assert native.first_moved(moved, units, table[units]) == 3
    assert (
        native.first_moved(table, np.array([3, 64], dtype=np.int64), np.array([3, 0], dtype=np.uint32)) == 1
    )
    assert native.first_moved(table, np.array([-1], dtype=np.int64), np.array([0], dtype=np.uint32)) == 0
    assert native.first_moved(table, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint32)) == -1
