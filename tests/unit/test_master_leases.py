"""LeaseTable: lease_count pinning, release, expiry from the heap (lazy deletion), recycled rows."""

from __future__ import annotations

import numpy as np

from kvstore.master.index import PageIndex
from kvstore.master.leases import LeaseTable


def setup(n: int = 4) -> tuple[PageIndex, LeaseTable, np.ndarray]:
    index = PageIndex()
    index.add_namespace(0, 4096, 1, 1)
    rows = index.alloc(n)
    packed = b"".join(i.to_bytes(16, "little") for i in range(n))
    index.insert(
        0,
        rows,
        packed,
        np.zeros(n, np.uint16),
        np.arange(n, dtype=np.uint64) * 4096,
        np.ones(n, np.uint32),
        now=0.0,
    )
    index.complete(rows, now=0.0)
    return index, LeaseTable(index), rows


def test_leases_pin_rows_and_release_unpins() -> None:
    index, leases, rows = setup()
    a = leases.create(0, "ns", rows[:3], b"", expires=10.0)
    b = leases.create(0, "ns", rows[:2], b"", expires=20.0)
    assert index.lease_count[rows].tolist() == [2, 2, 1, 0]
    assert len(a.lease_id) == 32 and a.lease_id != b.lease_id
    unpinned = leases.release(a.lease_id)
    assert unpinned is not None and unpinned.tolist() == [rows[2]]
    assert index.lease_count[rows].tolist() == [1, 1, 0, 0]
    assert leases.release(a.lease_id) is None  # only once
    assert len(leases) == 1


def test_expiry_comes_from_the_heap_and_skips_released_leases() -> None:
    index, leases, rows = setup()
    early = leases.create(0, "ns", rows[:1], b"", expires=5.0)
    late = leases.create(0, "ns", rows[1:2], b"", expires=50.0)
    also_early = leases.create(0, "ns", rows[2:3], b"", expires=6.0)
    leases.release(early.lease_id)
    assert leases.get(also_early.lease_id, now=5.5) is also_early
    ended = leases.expire(now=10.0)
    assert [r.tolist() for r in ended] == [[rows[2]]]
    assert leases.get(also_early.lease_id, now=10.0) is None
    assert leases.get(late.lease_id, now=10.0) is late
    assert leases.get(late.lease_id, now=50.0) is None  # expired even before the sweep
    assert leases.expire(now=60.0)[0].tolist() == [rows[1]]
    assert len(leases) == 0
    assert index.lease_count[rows].sum() == 0


def test_a_row_freed_under_a_lease_is_not_unpinned_twice() -> None:
    index, leases, rows = setup()
    lease = leases.create(0, "ns", rows, b"", expires=10.0)
    # the node holding rows[1] died: the row is freed and reused by another page
    index.unlink(rows[1:2])
    index.release(rows[1:2])
    reused = index.alloc(1)
    assert reused[0] == rows[1]
    index.insert(
        0,
        reused,
        (99).to_bytes(16, "little"),
        np.zeros(1, np.uint16),
        np.zeros(1, np.uint64),
        np.ones(1, np.uint32),
        now=0.0,
    )
    index.lease_count[reused] = 1  # a lease of the new page
    assert lease.valid_prefix(index) == 1
    leases.release(lease.lease_id)
    assert index.lease_count[reused[0]] == 1
