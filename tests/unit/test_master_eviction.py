"""LruLeavesFirst: leaves first, least recently used first, leased/pinned/excluded rows skipped."""

from __future__ import annotations

import numpy as np

from kvstore.master.eviction import LruLeavesFirst
from kvstore.master.index import ORPHAN, ROOT, PageIndex

SLOT = 8192
NOW = 1000.0


def build(chains: list[int]) -> tuple[PageIndex, list[np.ndarray]]:
    """Complete chains of the given lengths on node 0, namespace 0; recency = row order."""
    index = PageIndex()
    index.add_namespace(0, SLOT, 1, 1)
    out = []
    n = 0
    for length in chains:
        rows = index.alloc(length)
        packed = b"".join((n + i).to_bytes(16, "little") for i in range(length))
        index.insert(
            0,
            rows,
            packed,
            np.zeros(length, np.uint16),
            np.arange(n, n + length, dtype=np.uint64) * SLOT,
            np.ones(length, np.uint32),
            now=0.0,
        )
        index.parent[rows] = np.concatenate(([ROOT], rows[:-1]))
        index.child_count[rows[:-1]] = 1
        index.complete(rows, now=0.0)
        index.last_access[rows] = np.arange(n, n + length, dtype=np.float64)
        out.append(rows)
        n += length
    return index, out


def free(index: PageIndex, rows: np.ndarray) -> None:
    index.unlink(rows)
    index.release(rows)


def test_only_leaves_go_and_parents_become_leaves_afterwards() -> None:
    index, (a, b) = build([4, 1])
    index.last_access[a] = [5.0, 4.0, 3.0, 2.0]  # the prefix was matched more recently than the tail
    index.last_access[b] = 3.5
    policy = LruLeavesFirst()
    # a[0] is not the oldest page, yet it can only go after everything that extends it
    assert policy.select(index, SLOT, NOW).tolist() == [a[3]]
    assert policy.select(index, 100 * SLOT, NOW).tolist() == [a[3], a[2], b[0], a[1], a[0]]
    free(index, np.array([a[3]]))
    assert policy.select(index, SLOT, NOW).tolist() == [a[2]]


def test_a_chain_is_taken_tail_first_in_one_pass() -> None:
    index, (a, b) = build([4, 3])
    index.last_access[a] = 1.0  # a chain touched as a whole shares its recency
    index.last_access[b] = 9.0
    policy = LruLeavesFirst()
    assert policy.select(index, 3 * SLOT, NOW).tolist() == [a[3], a[2], a[1]]
    assert policy.select(index, 100 * SLOT, NOW, max_victims=5).tolist() == [a[3], a[2], a[1], a[0], b[2]]
    # a leased page stops the climb: neither it nor anything above it goes
    index.lease_count[a[1]] = 1
    assert policy.select(index, 4 * SLOT, NOW).tolist() == [a[3], a[2], b[2], b[1]]


def test_least_recently_used_leaf_first_and_need_is_respected() -> None:
    index, (a, b, c) = build([2, 2, 2])
    index.last_access[b[1]] = -5.0  # b's leaf is the oldest
    victims = LruLeavesFirst().select(index, SLOT, NOW)
    assert victims.tolist() == [b[1]]
    victims = LruLeavesFirst().select(index, 2 * SLOT, NOW)
    assert victims.tolist() == [b[1], a[1]]


def test_leased_pinned_and_excluded_rows_are_skipped() -> None:
    index, (a, b, c, d) = build([1, 1, 1, 1])
    index.lease_count[a[0]] = 1
    index.pin_until[b[0]] = NOW + 10
    victims = LruLeavesFirst().select(index, 10 * SLOT, NOW, exclude=np.array([c[0]]))
    assert victims.tolist() == [d[0]]
    index.pin_until[b[0]] = NOW - 1  # pin expired
    assert b[0] in LruLeavesFirst().select(index, 10 * SLOT, NOW).tolist()


def test_stale_pending_and_orphans_go_before_lru_pages() -> None:
    index, (a, b) = build([1, 1])
    rows = index.alloc(1)
    index.insert(
        0,
        rows,
        (99).to_bytes(16, "little"),
        np.zeros(1, np.uint16),
        np.array([99 * SLOT], np.uint64),
        np.ones(1, np.uint32),
        now=0.0,
    )
    index.deadline[rows] = NOW - 1
    index.last_access[rows] = NOW  # recent, but abandoned
    index.parent[b[0]] = ORPHAN
    index.last_access[b[0]] = NOW
    victims = LruLeavesFirst().select(index, 3 * SLOT, NOW)
    assert victims.tolist() == [rows[0], b[0], a[0]]


def test_node_and_namespace_scopes_and_batch_bound() -> None:
    index, (a, b) = build([1, 1])
    index.node[b[0]] = 1
    assert LruLeavesFirst().select(index, 10 * SLOT, NOW, node=1).tolist() == [b[0]]
    assert LruLeavesFirst().select(index, 10 * SLOT, NOW, namespace=3).tolist() == []
    index2, chains = build([1] * 50)
    assert len(LruLeavesFirst().select(index2, 100 * SLOT, NOW, max_victims=7)) == 7
