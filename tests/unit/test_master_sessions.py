"""SessionTable: claims per head range, expiry reclaiming pending pages, abort."""

from __future__ import annotations

import numpy as np

from kvstore.master.index import PageIndex
from kvstore.master.sessions import SessionTable


def setup(n: int = 3, layers: int = 2, heads: int = 4) -> tuple[PageIndex, SessionTable, np.ndarray]:
    index = PageIndex()
    index.add_namespace(0, 4096 * layers, layers, heads)
    rows = index.alloc(n)
    packed = b"".join(i.to_bytes(16, "little") for i in range(n))
    index.insert(
        0,
        rows,
        packed,
        np.zeros(n, np.uint16),
        np.arange(n, dtype=np.uint64) * 8192,
        np.ones(n, np.uint32),
        now=0.0,
    )
    return index, SessionTable(index), rows


def test_expired_session_hands_back_its_pending_pages() -> None:
    index, sessions, rows = setup()
    session = sessions.open(0, "ns", rows, (0, 4), 2, expires=10.0)
    assert sessions.get(session.session_id, now=9.0) is session
    assert index.deadline[rows].tolist() == [10.0] * 3
    assert sessions.expire(now=9.9) == []
    (orphaned,) = sessions.expire(now=10.0)
    assert orphaned.tolist() == rows.tolist()
    assert sessions.get(session.session_id, now=10.0) is None
    assert len(sessions) == 0


def test_pages_shared_with_a_live_writer_are_kept() -> None:
    index, sessions, rows = setup()
    first = sessions.open(0, "ns", rows, (0, 2), 2, expires=10.0)
    second = sessions.open(0, "ns", rows[:1], (2, 4), 2, expires=30.0)
    assert index.deadline[rows].tolist() == [30.0, 10.0, 10.0]
    (orphaned,) = sessions.expire(now=15.0)
    assert orphaned.tolist() == rows[1:].tolist()
    # the first writer's heads are free again for a newcomer
    assert index.pending[0].available(index.pend[rows[:1]], (0, 2)).all()
    assert not index.pending[0].available(index.pend[rows[:1]], (2, 4)).any()
    assert sessions.get(second.session_id, now=15.0) is second
    assert first.left


def test_abort_frees_only_pages_no_other_live_session_holds() -> None:
    index, sessions, rows = setup()
    mine = sessions.open(0, "ns", rows, (0, 2), 2, expires=10.0)
    sessions.open(0, "ns", rows[2:], (2, 4), 2, expires=10.0)
    freed = sessions.abort(mine.session_id)
    assert freed is not None and freed.tolist() == rows[:2].tolist()
    assert sessions.abort(mine.session_id) is None


def test_finished_session_keeps_pages_until_its_expiry() -> None:
    index, sessions, rows = setup()
    tp0 = sessions.open(0, "ns", rows, (0, 2), 2, expires=10.0)
    table = index.pending[0]
    table.commit(index.pend[rows], np.array([0, 1]), (0, 2))
    sessions.finish(tp0)
    # committed heads stay taken through the coverage, not the claim
    assert not table.available(index.pend[rows], (0, 2)).any()
    assert table.available(index.pend[rows], (2, 4)).all()
    # nobody wrote heads 2-4: once the finished session expires, the pages are abandoned
    (orphaned,) = sessions.expire(now=11.0)
    assert orphaned.tolist() == rows.tolist()


def test_completed_pages_are_not_reclaimed() -> None:
    index, sessions, rows = setup(heads=1)
    session = sessions.open(0, "ns", rows, (0, 1), 2, expires=10.0)
    complete, _ = index.pending[0].commit(index.pend[rows[:2]], np.array([0, 1]), (0, 1))
    index.complete(rows[:2][complete], now=1.0)
    (orphaned,) = sessions.expire(now=10.0)
    assert orphaned.tolist() == [rows[2]]
    assert sessions.pending_rows(session).tolist() == [rows[2]]
