"""Read leases (DESIGN.md, "Get" and invariant 2).

A lease pins the slots of a matched prefix: ``lease_count`` of each row goes up
while it lives, and nothing with a non-zero count is evicted, moved or freed.
Leases remember ``(row, epoch)`` pairs, so a row freed under them anyway (its
node died) is recognised as gone instead of being confused with the row's next
page.  Expiry comes from a heap with lazy deletion: released leases leave their
heap entry behind and are skipped when it surfaces.
"""

from __future__ import annotations

import heapq
import secrets
from dataclasses import dataclass

import numpy as np

from kvstore.master.index import PageIndex

_ONE = np.uint32(1)  # lease_count's dtype: ufunc.at with a matching scalar is ~25x faster


@dataclass
class ReadLease:
    lease_id: str
    ns_id: int
    namespace: str
    rows: np.ndarray  # i64, page order
    epochs: np.ndarray  # u32, the rows' epochs when leased
    keys: bytes  # packed matched keys
    expires: float  # seconds (clock of the master)

    def valid_prefix(self, index: PageIndex) -> int:
        """Pages of the lease still held: up to the first row freed under it."""
        ok = index.valid(self.rows, self.epochs)
        return len(ok) if ok.all() else int(np.argmin(ok))


class LeaseTable:
    def __init__(self, index: PageIndex) -> None:
        self._index = index
        self._leases: dict[str, ReadLease] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._leases)

    def create(self, ns_id: int, namespace: str, rows: np.ndarray, keys: bytes, expires: float) -> ReadLease:
        lease = ReadLease(
            lease_id=secrets.token_hex(16),
            ns_id=ns_id,
            namespace=namespace,
            rows=rows.astype(np.int64, copy=True),
            epochs=self._index.epoch[rows].copy(),
            keys=keys,
            expires=expires,
        )
        np.add.at(self._index.lease_count, lease.rows, _ONE)
        self._leases[lease.lease_id] = lease
        heapq.heappush(self._heap, (expires, lease.lease_id))
        return lease

    def get(self, lease_id: str, now: float) -> ReadLease | None:
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires <= now:
            return None
        return lease

    def release(self, lease_id: str) -> np.ndarray | None:
        """End a lease; returns the rows it was the last lease on (None: no such lease)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        return self._unpin(lease)

    def expire(self, now: float, limit: int = 10_000) -> list[np.ndarray]:
        """End leases due by ``now`` (at most ``limit``); returns, per lease, rows left without a lease."""
        unpinned: list[np.ndarray] = []
        while self._heap and self._heap[0][0] <= now and len(unpinned) < limit:
            expires, lease_id = heapq.heappop(self._heap)
            lease = self._leases.get(lease_id)
            if lease is None or lease.expires != expires:
                continue  # released earlier: a lazily deleted heap entry
            del self._leases[lease_id]
            unpinned.append(self._unpin(lease))
        return unpinned

    def _unpin(self, lease: ReadLease) -> np.ndarray:
        live = lease.rows[self._index.valid(lease.rows, lease.epochs)]
        if not len(live):
            return live
        np.subtract.at(self._index.lease_count, live, _ONE)
        return live[self._index.lease_count[live] == 0]
