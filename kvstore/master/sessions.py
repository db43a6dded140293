"""Put sessions (DESIGN.md, "Put" and "Shards").

A session is one writer's claim on the NEW pages of one OpenPut, for its head
range: it remembers ``(row, epoch)`` pairs, the head range and which layers
it has committed.  Each pending page counts the live sessions that claimed it
and carries a write deadline (the latest expiry among them).  When a session
ends without completing a page (expiry or abort) and no other live session
holds that page, the page is reclaimed.  Expiry comes from a heap; a sweep
touches only sessions that are due.
"""

from __future__ import annotations

import heapq
import secrets
from dataclasses import dataclass

import numpy as np

from kvstore.master.index import PENDING, PageIndex


@dataclass
class PutSession:
    session_id: int
    ns_id: int
    namespace: str
    rows: np.ndarray  # i64 rows of this writer's NEW pages, page order
    epochs: np.ndarray  # u32
    heads: tuple[int, int]
    committed: np.ndarray  # bool per layer: committed by this writer
    expires: float
    done: bool = False  # every layer committed: claims handed over to coverage
    left: bool = False  # no longer counted as a writer of its pages

    @property
    def num_pages(self) -> int:
        return len(self.rows)


class SessionTable:
    def __init__(self, index: PageIndex) -> None:
        self._index = index
        self._sessions: dict[int, PutSession] = {}
        self._heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def open_count(self) -> int:
        return sum(1 for s in self._sessions.values() if not s.done)

    def open(
        self,
        ns_id: int,
        namespace: str,
        rows: np.ndarray,
        heads: tuple[int, int],
        num_layers: int,
        expires: float,
    ) -> PutSession:
        """Claim ``heads`` of ``rows`` (all PENDING) for a new writer."""
        session_id = 0
        while session_id == 0 or session_id in self._sessions:
            session_id = secrets.randbits(64)
        index = self._index
        session = PutSession(
            session_id=session_id,
            ns_id=ns_id,
            namespace=namespace,
            rows=rows.astype(np.int64, copy=True),
            epochs=index.epoch[rows].copy(),
            heads=heads,
            committed=np.zeros(num_layers, dtype=bool),
            expires=expires,
        )
        if len(rows):
            index.pending[ns_id].claim(index.pend[rows], heads)
            index.deadline[rows] = np.maximum(index.deadline[rows], expires)
        self._sessions[session_id] = session
        heapq.heappush(self._heap, (expires, session_id))
        return session

    def get(self, session_id: int, now: float) -> PutSession | None:
        session = self._sessions.get(session_id)
        if session is None or session.expires <= now:
            return None
        return session

    def pending_rows(self, session: PutSession) -> np.ndarray:
        """The session's pages that are still the same pending pages."""
        index = self._index
        ok = index.valid(session.rows, session.epochs) & (index.state[session.rows] == PENDING)
        return session.rows[ok]

    def finish(self, session: PutSession) -> None:
        """Every layer committed: the coverage now says what the claims said."""
        if session.done:
            return
        session.done = True
        self._unclaim(session)

    def abort(self, session_id: int) -> np.ndarray | None:
        """End a session now; returns its pending pages no other live session holds (to free)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        return self._leave(session)

    def expire(self, now: float, limit: int = 10_000) -> list[np.ndarray]:
        """End sessions due by ``now``; returns, per session, pending pages left without a writer."""
        orphaned: list[np.ndarray] = []
        ended = 0
        while self._heap and self._heap[0][0] <= now and ended < limit:
            expires, session_id = heapq.heappop(self._heap)
            session = self._sessions.get(session_id)
            if session is None or session.expires != expires:
                continue
            del self._sessions[session_id]
            ended += 1
            orphaned.append(self._leave(session))
        return orphaned

    def drop_namespace(self, ns_id: int) -> int:
        """Forget every session of a deleted namespace (its pages are being freed)."""
        doomed = [sid for sid, s in self._sessions.items() if s.ns_id == ns_id]
        for sid in doomed:
            self._sessions[sid].left = True
            del self._sessions[sid]
        return len(doomed)

    def _unclaim(self, session: PutSession) -> None:
        rows = self.pending_rows(session)
        table = self._index.pending.get(session.ns_id)
        if len(rows) and table is not None:
            table.unclaim(self._index.pend[rows], session.heads)

    def _leave(self, session: PutSession) -> np.ndarray:
        if session.left:
            return np.zeros(0, dtype=np.int64)
        session.left = True
        if not session.done:
            self._unclaim(session)
        rows = self.pending_rows(session)
        table = self._index.pending.get(session.ns_id)
        if not len(rows) or table is None:
            return np.zeros(0, dtype=np.int64)
        writers_left = table.leave(self._index.pend[rows])
        return rows[writers_left == 0]
