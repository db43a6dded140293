"""Eviction policies (DESIGN.md, "Tiers and eviction").

A policy only chooses rows; the master frees them.  Every choice is a few
vectorised passes over the index columns, bounded by ``max_victims`` so that no
single pass holds the event loop for long.  The caller repeats passes: evicting
a leaf can turn its parent into a leaf.
"""

from __future__ import annotations

import abc

import numpy as np

from kvstore.master.index import COMPLETE, ORPHAN, PENDING, PageIndex


class EvictionPolicy(abc.ABC):
    """Chooses which pages go when room is needed."""

    @abc.abstractmethod
    def select(
        self,
        index: PageIndex,
        need_bytes: int,
        now: float,
        *,
        node: int | None = None,
        namespace: int | None = None,
        exclude: np.ndarray | None = None,
        max_victims: int = 1024,
    ) -> np.ndarray:
        """Rows to free (at most ``max_victims``) towards ``need_bytes``; may return fewer bytes than asked."""


class LruLeavesFirst(EvictionPolicy):
    """Prefix-aware LRU.

    Order: incomplete pages whose write deadline passed, then complete pages
    that can never be matched (orphans), then complete leaves (no child page),
    least recently used first.  Never a page under a read lease, a pinned page
    or a row the caller excludes (the pages of the request being served).
    """

    def select(
        self,
        index: PageIndex,
        need_bytes: int,
        now: float,
        *,
        node: int | None = None,
        namespace: int | None = None,
        exclude: np.ndarray | None = None,
        max_victims: int = 1024,
    ) -> np.ndarray:
        high = index.high
        if need_bytes <= 0 or high == 0 or max_victims <= 0:
            return np.zeros(0, dtype=np.int64)
        state = index.state[:high]
        scope = index.lease_count[:high] == 0
        if node is not None:
            scope &= index.node[:high] == node
        if namespace is not None:
            scope &= index.ns[:high] == namespace
        if exclude is not None and len(exclude):
            scope[exclude[(exclude >= 0) & (exclude < high)]] = False
        leaf = scope & (index.child_count[:high] == 0)

        stale_pending = scope & (state == PENDING) & (index.deadline[:high] < now)
        complete_leaf = leaf & (state == COMPLETE)
        orphan = complete_leaf & (index.parent[:high] == ORPHAN)
        lru = complete_leaf & ~orphan & (index.pin_until[:high] <= now)

        chosen: list[np.ndarray] = []
        remaining_bytes = need_bytes
        remaining_rows = max_victims
        for mask, by_recency in ((stale_pending, False), (orphan, False), (lru, True)):
            if remaining_bytes <= 0 or remaining_rows <= 0:
                break
            rows = np.flatnonzero(mask)
            if not len(rows):
                continue
            if by_recency:
                rows = _least_recent(rows, index.last_access[rows], remaining_rows)
            else:
                rows = rows[:remaining_rows]
            sizes = index.row_bytes(rows).astype(np.int64)
            covered = np.cumsum(sizes)
            # keep rows up to and including the first that reaches the need
            cut = int(np.searchsorted(covered, remaining_bytes, side="left")) + 1
            rows = rows[:cut]
            chosen.append(rows)
            remaining_bytes -= int(covered[min(cut, len(covered)) - 1])
            remaining_rows -= len(rows)
        if not chosen:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(chosen).astype(np.int64)


def _least_recent(rows: np.ndarray, last_access: np.ndarray, limit: int) -> np.ndarray:
    """The ``limit`` least recently used rows, oldest first (argpartition: no full sort)."""
    if len(rows) > limit:
        part = np.argpartition(last_access, limit - 1)[:limit]
        rows, last_access = rows[part], last_access[part]
    return rows[np.argsort(last_access, kind="stable")]
