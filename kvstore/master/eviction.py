"""Eviction policies (DESIGN.md, "Tiers and eviction").

A policy only chooses rows; the master frees them.  Every choice is a few
vectorised passes over the index columns, bounded by ``max_victims`` so that no
single pass holds the event loop for long.  The caller repeats passes: evicting
a leaf can turn its parent into a leaf.
"""

from __future__ import annotations

import abc
import heapq

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
        for phase, mask in (("stale", stale_pending), ("orphan", orphan), ("lru", lru)):
            if remaining_bytes <= 0 or remaining_rows <= 0:
                break
            rows = np.flatnonzero(mask)
            if not len(rows):
                continue
            if phase == "lru":
                rows = _lru_leaves_first(
                    index, rows, remaining_bytes, remaining_rows, now, _Scope(node, namespace, exclude)
                )
            else:
                rows = rows[:remaining_rows]
            if not len(rows):
                continue
            sizes = index.row_bytes(rows).astype(np.int64)
            covered = np.cumsum(sizes)
            # keep rows up to and including the first that reaches the need
            cut = min(int(np.searchsorted(covered, remaining_bytes, side="left")) + 1, len(rows))
            chosen.append(rows[:cut])
            remaining_bytes -= int(covered[cut - 1])
            remaining_rows -= cut
        if not chosen:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(chosen).astype(np.int64)


class _Scope:
    """The restrictions of one selection, checked on a parent that just became a leaf."""

    def __init__(self, node: int | None, namespace: int | None, exclude: np.ndarray | None) -> None:
        self.node = node
        self.namespace = namespace
        self.exclude = set(exclude.tolist()) if exclude is not None and len(exclude) else set()

    def evictable(self, index: PageIndex, row: int, now: float) -> bool:
        return (
            index.state[row] == COMPLETE
            and index.lease_count[row] == 0
            and index.pin_until[row] <= now
            and (self.node is None or index.node[row] == self.node)
            and (self.namespace is None or index.ns[row] == self.namespace)
            and row not in self.exclude
        )


def _lru_leaves_first(
    index: PageIndex, leaves: np.ndarray, need_bytes: int, max_rows: int, now: float, scope: _Scope
) -> np.ndarray:
    """Least recently used first, where a parent becomes a candidate once all its children are taken.

    Only the ``max_rows`` oldest leaves are considered (argpartition, no full
    sort); a heap merges parents in as they become leaves.  The walk stops at
    the first candidate newer than the oldest leaf left outside that window,
    so the order is exact; the caller runs another pass for more.  Parents
    come after all their children: any prefix of the result is leaves-first,
    and a long chain goes in one pass instead of one pass per page.
    """
    access = index.last_access[leaves]
    boundary = float("inf")
    if len(leaves) > max_rows:
        part = np.argpartition(access, max_rows)
        boundary = float(access[part[max_rows]])
        leaves, access = leaves[part[:max_rows]], access[part[:max_rows]]
    order = np.argsort(access, kind="stable")
    heap = list(zip(access[order].tolist(), leaves[order].tolist(), strict=True))  # sorted: already a heap
    children_taken: dict[int, int] = {}
    taken: list[int] = []
    taken_bytes = 0
    while heap and len(taken) < max_rows and taken_bytes < need_bytes:
        recency, row = heapq.heappop(heap)
        if recency > boundary:
            break
        taken.append(row)
        taken_bytes += int(index.ns_slot_bytes[index.ns[row]])
        parent = int(index.parent[row])
        if parent < 0:
            continue
        children_taken[parent] = children_taken.get(parent, 0) + 1
        if children_taken[parent] == index.child_count[parent] and scope.evictable(index, parent, now):
            heapq.heappush(heap, (float(index.last_access[parent]), parent))
    return np.array(taken, dtype=np.int64)
