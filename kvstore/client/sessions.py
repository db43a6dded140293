"""Put sessions cached between the put_layer calls of one sequence.

The first put_layer of a (token sequence, tp_rank, tp_size) opens a session on
the master, unless :meth:`KVStoreClient.open_put` opened it ahead in the
background; later layers reuse it.  The cache is a bounded LRU; a session
leaves it when the master says it is done, on abort, on error or on close.
A key is opened once (by the first put, or ahead by open_put); whoever asks for it
meanwhile waits for that open, and opens the session itself if that open failed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore.transports.base import NodeBatch

log = logging.getLogger("kvstore.client")

SessionKey = tuple[bytes, int, int]  # (digest of the keyed tokens and contexts, tp_rank, tp_size)


@dataclass
class PutSession:
    session_id: int
    num_pages: int
    new_pages: np.ndarray  # int64 page positions this writer writes, ascending
    batches: list[NodeBatch]  # the new pages grouped by node
    heads: tuple[int, int]
    expires_unix_ms: int
    # per batch, its pages' positions among new_pages (the commit checksums' columns): fixed per session
    columns: list[np.ndarray] = field(default_factory=list, repr=False)
    layers_seen: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Commits are pipelined: a put_layer hands its (layers, checksums) to the session's pump, a
    # task on the client's loop that keeps one CommitLayer in flight and merges whatever queued
    # up meanwhile into the next; only the put_layer that completes the layers waits for it.
    unsent: list[tuple[list[int], np.ndarray]] = field(default_factory=list, repr=False)
    pump: concurrent.futures.Future[Any] | None = field(default=None, repr=False)
    pumping: bool = False  # a pump is running and will look at ``unsent`` again before it ends
    completing: bool = False  # the put that completes the layers queued its entry: the pump's last commit
    commit_error: BaseException | None = None  # the first commit that failed
    failed: bool = False  # the put failed: nothing more is committed

    @property
    def has_work(self) -> bool:
        return len(self.new_pages) > 0


class SessionCache:
    def __init__(self, capacity: int = 512) -> None:
        self._capacity = capacity
        self._sessions: OrderedDict[SessionKey, PutSession] = OrderedDict()
        self._opening: dict[SessionKey, concurrent.futures.Future[PutSession]] = {}
        self._lock = threading.Lock()

    def claim_open(self, key: SessionKey) -> tuple[concurrent.futures.Future[PutSession], bool]:
        """A future of ``key``'s session (cached, or being opened), and whether the caller was
        made its opener: then it opens the session (waiting for it or not) and reports the
        outcome with :meth:`opened`, which resolves the future.  A session pushed out of the
        LRU is only forgotten, not aborted: its writer may still be at work, and the master
        expires it if not."""
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
                done: concurrent.futures.Future[PutSession] = concurrent.futures.Future()
                done.set_result(session)
                return done, False
            pending = self._opening.get(key)
            if pending is not None:
                return pending, False
            pending = self._opening[key] = concurrent.futures.Future()
            return pending, True

    def opened(
        self,
        key: SessionKey,
        pending: concurrent.futures.Future[PutSession],
        session: PutSession | None,
        error: BaseException | None,
    ) -> None:
        """The open of ``key`` (claimed by :meth:`claim_open`) ended: with ``session``, or ``error``."""
        with self._lock:
            if self._opening.get(key) is pending:
                del self._opening[key]
            if session is not None:
                self._sessions[key] = session
                while len(self._sessions) > self._capacity:
                    _, old = self._sessions.popitem(last=False)
                    log.debug(
                        "put session %d left the cache unfinished (capacity %d)",
                        old.session_id,
                        self._capacity,
                    )
        if pending.done():  # reported already: a put that gave up waiting (DEADLINE) before the open ended
            return
        if session is not None:
            pending.set_result(session)
        else:
            pending.set_exception(error if error is not None else RuntimeError("no session"))

    def settle(self, key: SessionKey, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``) for an open of ``key`` in progress, if any; its outcome lands in the cache."""
        with self._lock:
            pending = self._opening.get(key)
        if pending is not None:
            concurrent.futures.wait([pending], timeout)

    def get(self, key: SessionKey) -> PutSession | None:
        with self._lock:
            return self._sessions.get(key)

    def drop(self, key: SessionKey, session: PutSession | None = None) -> PutSession | None:
        """Forget ``key`` (only if it still maps to ``session``, when given)."""
        with self._lock:
            current = self._sessions.get(key)
            if current is None or (session is not None and current is not session):
                return None
            return self._sessions.pop(key)

    def drain(self) -> list[PutSession]:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            return sessions

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
