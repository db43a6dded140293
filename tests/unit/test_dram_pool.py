"""The DRAM pool file: create, attach, incarnations, generations, orphan sweep, allocation failure."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.base import SLOT_UNIT, STAGING_GRACE_S, Tier
from kvstore.tiers.dram import (
    DATA_ALIGN,
    POOL_PREFIX,
    STAGING_PREFIX,
    DramPool,
    read_header,
    sweep_orphans,
)

POOL_BYTES = 4 << 20


@pytest.fixture
def pool(tmp_path):
    p = DramPool.create(str(tmp_path), "node-a", POOL_BYTES, prefault=False)
    yield p
    p.close()


def test_create_lays_out_header_generations_and_data(pool, tmp_path):
    assert isinstance(pool, Tier)
    assert pool.tier == "dram"
    assert pool.capacity_bytes == POOL_BYTES
    assert os.path.basename(pool.path).startswith(POOL_PREFIX + "node-a-")
    header = read_header(pool.mm)
    assert header == pool.header
    assert header.owner_pid == os.getpid()
    assert len(header.incarnation) == 16
    assert header.data_offset % DATA_ALIGN == 0
    assert header.gen_entries == POOL_BYTES // SLOT_UNIT
    assert os.path.getsize(pool.path) == header.data_offset + POOL_BYTES
    view = pool.data_view()
    assert len(view) == POOL_BYTES and not view.readonly
    view[:4] = b"abcd"
    assert bytes(pool.bytes[header.data_offset : header.data_offset + 4]) == b"abcd"
    view.release()


def test_two_pools_have_distinct_incarnations(tmp_path):
    a = DramPool.create(str(tmp_path), "n", POOL_BYTES, prefault=False)
    b = DramPool.create(str(tmp_path), "n", POOL_BYTES, prefault=False)
    try:
        assert a.header.incarnation != b.header.incarnation
        assert a.path != b.path
    finally:
        a.close()
        b.close()


def test_attach_sees_the_owners_bytes_and_generations(pool):
    client = DramPool.attach(pool.path, pool.header.incarnation)
    try:
        assert not client.owner
        assert client.header == pool.header
        off = pool.header.data_offset + 3 * SLOT_UNIT
        pool.bytes[off : off + 5] = np.frombuffer(b"hello", dtype=np.uint8)
        assert bytes(client.bytes[off : off + 5]) == b"hello"
        slots = np.array([0, 3 * SLOT_UNIT, 7 * SLOT_UNIT], dtype=np.uint64)
        pool.set_generation(slots, np.array([4, 5, 6], dtype=np.uint32))
        assert client.generation(slots).tolist() == [4, 5, 6]
        assert client.data_address - client.base_address == pool.header.data_offset
    finally:
        client.close()
    assert os.path.exists(pool.path), "a client's close must not remove the node's pool"


def test_attach_with_another_incarnation_is_stale(pool):
    with pytest.raises(KVStoreError) as info:
        DramPool.attach(pool.path, b"\x00" * 16)
    assert info.value.code is ErrorCode.STALE_INCARNATION


def test_attach_to_a_missing_file_is_stale(tmp_path):
    with pytest.raises(KVStoreError) as info:
        DramPool.attach(str(tmp_path / "kvstore-pool-gone"), b"\x00" * 16)
    assert info.value.code is ErrorCode.STALE_INCARNATION


def test_attach_to_a_foreign_file_is_stale(tmp_path):
    path = tmp_path / "not-a-pool"
    path.write_bytes(b"x" * 8192)
    with pytest.raises(KVStoreError) as info:
        DramPool.attach(str(path), b"\x00" * 16)
    assert info.value.code is ErrorCode.STALE_INCARNATION


def test_owner_close_removes_the_file(tmp_path):
    p = DramPool.create(str(tmp_path), "n", POOL_BYTES, prefault=False)
    path = p.path
    p.close()
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []


def test_close_with_a_view_still_exported_still_unlinks(tmp_path):
    p = DramPool.create(str(tmp_path), "n", POOL_BYTES, prefault=False)
    view = p.data_view()  # held on purpose
    p.close()
    assert not os.path.exists(p.path)
    view.release()


def test_prefault_zeroes_and_touches(tmp_path):
    p = DramPool.create(str(tmp_path), "n", POOL_BYTES, prefault=True)
    try:
        assert not p.bytes[p.header.data_offset :].any()
    finally:
        p.close()


def test_size_must_be_a_multiple_of_the_slot_unit(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        DramPool.create(str(tmp_path), "n", 4096 + 1, prefault=False)
    with pytest.raises(ValueError):
        DramPool.create(str(tmp_path), "n", 0, prefault=False)


def test_an_absurd_size_fails_at_create_with_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="cannot reserve .* bytes for the DRAM pool"):
        DramPool.create(str(tmp_path), "n", 1 << 50, prefault=False)  # 1 PiB
    assert os.listdir(tmp_path) == [], "a failed create must not leave a file behind"


def test_sweep_removes_unlocked_pool_files_and_keeps_live_ones(pool, tmp_path):
    orphan = tmp_path / (POOL_PREFIX + "dead-node-0123456789ab")
    orphan.write_bytes(b"\0" * 4096)
    unrelated = tmp_path / "something-else"
    unrelated.write_bytes(b"keep me")
    removed = sweep_orphans(str(tmp_path))
    assert removed == [str(orphan)]
    assert os.path.exists(pool.path), "a pool whose owner still holds its lock is kept"
    assert unrelated.exists()


def test_sweep_removes_the_pool_of_a_node_that_died(tmp_path):
    # A child creates a pool and dies without cleaning up: its flock goes with it.
    code = (
        "import os, sys; from kvstore.tiers.dram import DramPool; "
        f"p = DramPool.create({str(tmp_path)!r}, 'doomed', {POOL_BYTES}, prefault=False); "
        "print(p.path, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    path = out.stdout.strip()
    assert os.path.exists(path)
    assert sweep_orphans(str(tmp_path)) == [path]
    assert not os.path.exists(path)


def test_create_sweeps_orphans_first(tmp_path):
    orphan = tmp_path / (POOL_PREFIX + "dead-node-0123456789ab")
    orphan.write_bytes(b"\0" * 4096)
    p = DramPool.create(str(tmp_path), "n", POOL_BYTES, prefault=False)
    try:
        assert not orphan.exists()
    finally:
        p.close()


def test_sweep_of_a_missing_directory_is_a_no_op(tmp_path):
    assert sweep_orphans(str(tmp_path / "nope")) == []


def test_an_old_unlocked_staging_file_is_swept_and_a_young_one_kept(tmp_path: pathlib.Path) -> None:
    old = tmp_path / f"{STAGING_PREFIX}old"
    young = tmp_path / f"{STAGING_PREFIX}young"
    old.write_bytes(b"x")
    young.write_bytes(b"x")
    past = time.time() - STAGING_GRACE_S - 5
    os.utime(old, (past, past))
    removed = sweep_orphans(str(tmp_path))
    assert removed == [str(old)]
    assert young.exists()
