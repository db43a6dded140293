"""PageIndex: growth by doubling, row recycling with epochs, pending coverage, prefix matching."""

from __future__ import annotations

import numpy as np

from kvstore.master.index import COMPLETE, FREE, ORPHAN, PENDING, ROOT, KeyTable, PageIndex, PendingTable

ALIVE = np.ones(1 << 16, dtype=bool)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def chain(index: PageIndex, n: int, start: int = 0, parent: int = ROOT, ns: int = 0) -> np.ndarray:
    rows = index.alloc(n)
    packed = b"".join(key(start + i) for i in range(n))
    index.insert(
        ns,
        rows,
        packed,
        np.zeros(n, np.uint16),
        np.arange(n, dtype=np.uint64) * 4096,
        np.ones(n, np.uint32),
        now=1.0,
    )
    index.parent[rows] = np.concatenate(([parent], rows[:-1]))
    if parent >= 0:
        index.child_count[parent] += 1
    index.child_count[rows[:-1]] += 1
    return rows


def new_index(layers: int = 2, heads: int = 1, capacity: int = 4) -> PageIndex:
    index = PageIndex(capacity=capacity)
    index.add_namespace(0, 4096 * layers, layers, heads)
    return index


def test_grows_by_doubling_and_keeps_columns() -> None:
    index = new_index(capacity=4)
    rows = chain(index, 10)
    assert index.capacity >= 10
    assert rows.tolist() == list(range(10))
    assert index.lookup(0, b"".join(key(i) for i in range(10))).tolist() == list(range(10))
    assert np.all(index.state[rows] == PENDING)
    assert len(index) == 10


def test_rows_are_recycled_with_a_new_epoch() -> None:
    index = new_index()
    rows = chain(index, 3)
    epoch_before = index.epoch[rows[2]]
    index.unlink(rows[2:])
    index.release(rows[2:])
    assert index.state[rows[2]] == FREE
    assert index.lookup(0, key(2)).tolist() == [-1]
    assert index.child_count[rows[1]] == 0
    again = index.alloc(1)
    assert again.tolist() == [rows[2]]
    assert index.epoch[again[0]] == epoch_before + 1
    assert not index.valid(rows[2:], np.array([epoch_before], np.uint32))[0]
    assert index.high == 3


def test_freeing_a_parent_orphans_its_children() -> None:
    index = new_index()
    rows = chain(index, 3)
    index.unlink(rows[:1])
    index.release(rows[:1])
    assert index.parent[rows[1]] == ORPHAN
    assert index.parent[rows[2]] == rows[1]


def test_prefix_stops_at_incomplete_missing_and_misparented_pages() -> None:
    index = new_index()
    rows = chain(index, 5)
    packed = b"".join(key(i) for i in range(5))
    assert index.prefix_length(index.lookup(0, packed), ALIVE) == 0  # all pending
    index.complete(rows[[0, 1, 3, 4]], now=2.0)
    assert index.prefix_length(index.lookup(0, packed), ALIVE) == 2  # page 2 incomplete
    index.complete(rows[[2]], now=2.0)
    assert index.prefix_length(index.lookup(0, packed), ALIVE) == 5
    # a missing page ends the prefix even if later pages exist
    gap = packed[:32] + key(99) + packed[48:]
    assert index.prefix_length(index.lookup(0, gap), ALIVE) == 2
    # a page whose parent is not the previous page does not count
    index.parent[rows[3]] = ORPHAN
    assert index.prefix_length(index.lookup(0, packed), ALIVE) == 3
    # page 0 must hang from the root
    assert index.prefix_length(index.lookup(0, packed[16:]), ALIVE) == 0
    # a page on a dead node does not count
    dead = ALIVE.copy()
    dead[0] = False
    assert index.prefix_length(index.lookup(0, packed), dead) == 0


def test_pending_coverage_completes_only_when_every_head_of_every_layer_is_in() -> None:
    index = new_index(layers=3, heads=4)
    rows = chain(index, 2)
    table = index.pending[0]
    pend = index.pend[rows]
    assert table.available(pend, (0, 2)).all()
    table.claim(pend, (0, 2))
    assert not table.available(pend, (0, 2)).any()
    assert not table.available(pend, (1, 3)).any()  # overlaps a claim
    assert table.available(pend, (2, 4)).all()
    complete, full = table.commit(pend, np.array([0, 1, 2]), (0, 2))
    assert not complete.any() and full.tolist() == [0, 0]
    table.claim(pend, (2, 4))
    complete, full = table.commit(pend, np.array([0, 1]), (2, 4))
    assert not complete.any() and full.tolist() == [2, 2]
    complete, full = table.commit(pend, np.array([2]), (2, 4))
    assert complete.all() and full.tolist() == [3, 3]
    index.complete(rows, now=5.0)
    assert np.all(index.state[rows] == COMPLETE)
    assert np.all(index.pend[rows] == -1)
    assert len(table) == 0  # coverage dropped on completion


def test_pending_counts_of_full_layers_agree_with_the_coverage_through_random_commits() -> None:
    """PendingTable.commit counts full layers as commits come in; the coverage itself is the truth."""
    rng = np.random.default_rng(5)
    layers, heads = 4, 4
    table = PendingTable(layers, heads)
    pend = table.alloc(6)
    for _ in range(60):
        pages = rng.choice(pend, size=int(rng.integers(1, 7)), replace=False)
        named = rng.integers(0, layers, size=int(rng.integers(1, 4)))  # repeats allowed
        begin = int(rng.integers(0, heads))
        end = int(rng.integers(begin + 1, heads + 1))
        complete, full = table.commit(pages, named, (begin, end))
        truth = table.coverage[pages].all(axis=2)
        assert full.tolist() == truth.sum(axis=1).tolist()
        assert complete.tolist() == truth.all(axis=1).tolist()
    table.release(pend[:3])
    again = table.alloc(3)
    complete, full = table.commit(again, np.array([0]), (0, heads))
    assert full.tolist() == [1, 1, 1] and not complete.any()  # a recycled page starts from nothing


def test_namespaces_are_isolated() -> None:
    index = new_index()
    index.add_namespace(1, 4096, 1, 1)
    chain(index, 2, ns=0)
    assert index.lookup(1, key(0)).tolist() == [-1]


def test_key_table_agrees_with_a_dict_through_inserts_deletes_and_rebuilds() -> None:
    rng = np.random.default_rng(11)
    index = new_index()
    table = index.tables[0]
    truth: dict[bytes, int] = {}
    for step in range(60):
        n = int(rng.integers(1, 700))
        rows = index.alloc(n)
        packed = rng.integers(0, 256, 16 * n, dtype=np.uint8).tobytes()
        index.insert(
            0, rows, packed, np.zeros(n, np.uint16), np.zeros(n, np.uint64), np.ones(n, np.uint32), now=1.0
        )
        truth.update({packed[16 * i : 16 * (i + 1)]: int(r) for i, r in enumerate(rows)})
        if step % 3 == 2:  # free a random third of what is there
            live = np.array(sorted(truth.values()), dtype=np.int64)
            gone = rng.choice(live, size=len(live) // 3, replace=False)
            index.unlink(gone)
            index.release(gone)
            gone_set = set(gone.tolist())
            truth = {k: r for k, r in truth.items() if r not in gone_set}
        assert len(table) == len(truth)
        probe = list(truth)[:300] + [rng.integers(0, 256, 16, dtype=np.uint8).tobytes() for _ in range(50)]
        want = [truth.get(k, -1) for k in probe]
        assert index.lookup(0, b"".join(probe)).tolist() == want
    # deleted slots were recycled by rebuilds: the table stays within its load
    assert table.used + table.deleted <= KeyTable.MAX_LOAD * len(table.slots)


def test_key_table_handles_keys_that_share_a_home_slot() -> None:
    index = new_index()
    table = index.tables[0]
    # keys that differ only in their second word can still land on one probe chain: force it
    table._home = lambda words: np.zeros(len(words), dtype=np.int64)  # type: ignore[method-assign]
    rows = chain(index, 40)
    assert index.lookup(0, b"".join(key(i) for i in range(40))).tolist() == rows.tolist()
    index.unlink(rows[10:20])
    index.release(rows[10:20])
    found = index.lookup(0, b"".join(key(i) for i in range(40))).tolist()
    assert found == rows[:10].tolist() + [-1] * 10 + rows[20:].tolist()


def test_dropped_namespace_table_matches_nothing() -> None:
    index = new_index()
    chain(index, 5)
    index.drop_namespace_table(0)
    assert index.lookup(0, b"".join(key(i) for i in range(5))).tolist() == [-1] * 5
