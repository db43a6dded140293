"""The page index: a packed table of every page the cluster holds (DESIGN.md, "object index").

One row per page, stored column-wise in numpy arrays grown by doubling, so
millions of pages cost a few dozen bytes each and no Python object.  Keys map
to rows through one :class:`KeyTable` per namespace, an open-addressing hash
table of row numbers (4 bytes a slot) that compares against the keys column
itself (dropping a namespace drops its table in one step).  A dict of 16-byte
``bytes`` keys cost about 140 bytes a page; the whole index now costs about
100.  Freed rows are recycled through a free list; every row carries an
``epoch`` bumped when it is freed, so sessions and leases that remember
``(row, epoch)`` pairs notice a recycled row without a back-reference.

Head coverage (which heads of which layers are committed) is kept only for
pending pages, in a per-namespace :class:`PendingTable`, and dropped when the
page completes.
"""

from __future__ import annotations

import os

import numpy as np

from kvstore import _native
from kvstore.keys import KEY_BYTES

FREE, PENDING, COMPLETE, DOOMED = 0, 1, 2, 3
"""Row states.  DOOMED: its namespace was deleted while a read lease held it;
unmatchable, freed when the last lease ends."""

ROOT = -1
"""Parent of page 0 of a chain."""
ORPHAN = -2
"""Parent row was freed under the page (node loss, reclaim): unreachable until
a new put of the chain links it again."""

_INITIAL_ROWS = 1024
_ONE = np.uint32(1)  # the u32 counters' dtype: ufunc.at with a matching scalar is ~25x faster


def _grow(array: np.ndarray, capacity: int, fill: float | int = 0) -> np.ndarray:
    grown = np.full((capacity,) + array.shape[1:], fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


class KeyTable:
    """Rows of one namespace by page key: open addressing with linear probing, all in numpy.

    A slot holds a row number (``EMPTY``, ``DELETED`` or >= 0); the key itself
    lives in the index's ``keys`` column, so a slot costs 4 bytes and the table
    stays at most 70% full (counting deleted slots; it is rebuilt past that).
    Every operation is vectorised over a batch of keys: one numpy pass per probe
    step, a handful of steps at these loads.  Keys are hashed with a per-process
    random seed, so a client cannot aim many keys at one probe chain.
    """

    EMPTY = -1
    DELETED = -2
    MAX_LOAD = 0.7
    _MUL1 = np.uint64(0x9E3779B97F4A7C15)
    _MUL2 = np.uint64(0xBF58476D1CE4E5B9)

    def __init__(self, index: PageIndex, capacity: int = 1024) -> None:
        self._index = index
        self.slots = np.full(_pow2(capacity), self.EMPTY, dtype=np.int32)
        self.used = 0  # live entries
        self.deleted = 0
        self._seed = np.uint64(int.from_bytes(os.urandom(8), "little"))

    def __len__(self) -> int:
        return self.used

    @property
    def _mask(self) -> np.int64:
        return np.int64(len(self.slots) - 1)

    def _home(self, words: np.ndarray) -> np.ndarray:
        """First probe position of each key (``words``: [n, 2] u64)."""
        with np.errstate(over="ignore"):
            h = (words[:, 0] ^ self._seed) * self._MUL1
            h ^= (words[:, 1] + (h >> np.uint64(29))) * self._MUL2
            h ^= h >> np.uint64(32)
        return (h & np.uint64(len(self.slots) - 1)).astype(np.int64)

    def _words(self, rows: np.ndarray) -> np.ndarray:
        # a gather of 16-byte items: ~5x faster than of [n, 16] u8 rows
        return _rows16(self._index.keys)[rows].view(np.uint64).reshape(-1, 2)

    def find(self, words: np.ndarray) -> np.ndarray:
        """Row of each key (``words``: [n, 2] u64 of the 16-byte keys), -1 when absent."""
        n = len(words)
        found = np.full(n, -1, dtype=np.int64)
        if n == 0 or self.used == 0:
            return found
        # One native pass probes every key (numpy needed a pass per probe step, ~0.5 ms for 2048 keys).
        words = np.ascontiguousarray(words, dtype=np.uint64)
        _native.table_find(self.slots, self._index.keys, words, self._home(words), found)
        return found

    def insert(self, rows: np.ndarray) -> None:
        """Add ``rows`` (their keys already in the keys column; absent from the table, distinct)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        if (self.used + self.deleted + len(rows)) > self.MAX_LOAD * len(self.slots):
            self._rebuild(self.used + len(rows))
        self._place(rows)
        self.used += len(rows)

    def _place(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.deleted -= _native.table_place(self.slots, rows, self._home(self._words(rows)))

    def delete(self, rows: np.ndarray) -> None:
        """Forget ``rows`` (rows not in the table are ignored)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows) or self.used == 0:
            return
        active = np.arange(len(rows))
        pos = self._home(self._words(rows))
        mask = self._mask
        while len(active):
            if len(active) <= _TAIL:
                slots, m = self.slots, int(mask)
                for row, p in zip(rows[active].tolist(), pos.tolist(), strict=True):
                    while slots[p] != self.EMPTY and slots[p] != row:
                        p = (p + 1) & m
                    if slots[p] == row:
                        slots[p] = self.DELETED
                        self.used -= 1
                        self.deleted += 1
                return
            cand = self.slots[pos].astype(np.int64)
            hit = cand == rows[active]
            self.slots[pos[hit]] = self.DELETED
            self.used -= int(np.count_nonzero(hit))
            self.deleted += int(np.count_nonzero(hit))
            more = ~hit & (cand != self.EMPTY)
            active = active[more]
            pos = (pos[more] + 1) & mask

    def _rebuild(self, live: int) -> None:
        rows = self.slots[self.slots >= 0].astype(np.int64)
        self.slots = np.full(_pow2(max(1024, int(live / 0.5))), self.EMPTY, dtype=np.int32)
        self.deleted = 0
        self._place(rows)

    @property
    def nbytes(self) -> int:
        return int(self.slots.nbytes)


_TAIL = 24  # keys left in a batch below which probing goes on in plain Python


_V16 = np.dtype("V16")


class _FreeRows:
    """A LIFO stack of free row numbers in one i64 array (a Python list cost ~20 ns per row each way)."""

    __slots__ = ("_rows", "_count")

    def __init__(self) -> None:
        self._rows = np.zeros(1024, dtype=np.int64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        end = self._count + len(rows)
        if end > len(self._rows):
            self._rows = _grow(self._rows, max(2 * len(self._rows), end))
        self._rows[self._count : end] = rows
        self._count = end

    def pop(self, count: int) -> np.ndarray:
        """The last ``count`` rows pushed (fewer if fewer are free), in push order."""
        count = min(count, self._count)
        self._count -= count
        return self._rows[self._count : self._count + count].copy()


def _rows16(keys: np.ndarray) -> np.ndarray:
    """A [n, 16] u8 key column as n 16-byte items (fancy indexing moves each key as one item)."""
    return keys.view(_V16).reshape(-1)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


class PendingTable:
    """Head coverage of the pending pages of one namespace.

    ``coverage[p, layer, head]``: committed; ``claimed[p, head]``: a live
    writer owns that head; ``writers[p]``: live sessions that claimed the page
    (the page is reclaimed when it drops to 0 before completion).
    """

    def __init__(self, num_layers: int, num_heads: int, capacity: int = 64) -> None:
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.coverage = np.zeros((capacity, num_layers, num_heads), dtype=bool)
        # layers of each page with every head committed, kept as commits come in: a commit then
        # looks at the layers it names, not at the page's whole coverage (16384 pages x 32 layers)
        self.full = np.zeros(capacity, dtype=np.uint16)
        self.claimed = np.zeros((capacity, num_heads), dtype=bool)
        self.writers = np.zeros(capacity, dtype=np.uint32)
        self._free = _FreeRows()
        self._high = 0

    def __len__(self) -> int:
        return self._high - len(self._free)

    def alloc(self, count: int) -> np.ndarray:
        taken = self._free.pop(count)
        fresh = count - len(taken)
        if self._high + fresh > len(self.writers):
            capacity = max(len(self.writers) * 2, self._high + fresh)
            self.coverage = _grow(self.coverage, capacity)
            self.full = _grow(self.full, capacity)
            self.claimed = _grow(self.claimed, capacity)
            self.writers = _grow(self.writers, capacity)
        slots = np.concatenate((taken, np.arange(self._high, self._high + fresh, dtype=np.int64)))
        self._high += fresh
        self.coverage[slots] = False
        self.full[slots] = 0
        self.claimed[slots] = False
        self.writers[slots] = 0
        return slots.astype(np.int64)

    def release(self, slots: np.ndarray) -> None:
        if len(slots):
            self._free.push(slots)

    def available(self, slots: np.ndarray, heads: tuple[int, int]) -> np.ndarray:
        """Pages on which ``heads`` are neither claimed by a live writer nor already fully committed."""
        h0, h1 = heads
        claimed = self.claimed[slots, h0:h1].any(axis=1)
        covered = self.coverage[slots, :, h0:h1].all(axis=(1, 2))
        return np.logical_not(claimed | covered)

    def claim(self, slots: np.ndarray, heads: tuple[int, int]) -> None:
        self.claimed[slots, heads[0] : heads[1]] = True
        np.add.at(self.writers, slots, _ONE)

    def unclaim(self, slots: np.ndarray, heads: tuple[int, int]) -> None:
        """Drop a writer's claim on its heads (its writer count stays until it expires)."""
        self.claimed[slots, heads[0] : heads[1]] = False

    def leave(self, slots: np.ndarray) -> np.ndarray:
        """One writer is gone from each page; returns the writer counts left."""
        np.subtract.at(self.writers, slots, _ONE)
        return self.writers[slots]

    def commit(
        self, slots: np.ndarray, layers: np.ndarray, heads: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mark ``heads`` of ``layers`` committed; return (complete mask, layers fully committed) per page.

        Only the named layers are looked at: the count of full layers per page
        (``full``) grows by those that were not full before and are now.
        """
        layers = np.unique(layers)  # a layer named twice counts once
        h0, h1 = heads
        picked = (slots[:, None], layers[None, :])
        was_full = self.coverage[picked].all(axis=2)
        self.coverage[slots[:, None], layers[None, :], h0:h1] = True
        # every head in one commit (no tensor parallelism): each named layer is full now
        now_full = True if h1 - h0 >= self.num_heads else self.coverage[picked].all(axis=2)
        gained = np.count_nonzero(now_full & ~was_full, axis=1)
        full = self.full[slots] + gained.astype(np.uint16)
        self.full[slots] = full
        return full >= self.num_layers, full


class PageIndex:
    """Packed page table; see the module docstring."""

    def __init__(self, capacity: int = _INITIAL_ROWS) -> None:
        self.keys = np.zeros((capacity, KEY_BYTES), dtype=np.uint8)
        self.ns = np.zeros(capacity, dtype=np.uint16)
        self.parent = np.full(capacity, ROOT, dtype=np.int64)
        self.node = np.zeros(capacity, dtype=np.uint16)
        self.slot = np.zeros(capacity, dtype=np.uint64)
        self.generation = np.zeros(capacity, dtype=np.uint32)
        self.state = np.zeros(capacity, dtype=np.uint8)
        self.layers_complete = np.zeros(capacity, dtype=np.uint16)
        self.last_access = np.zeros(capacity, dtype=np.float64)
        self.lease_count = np.zeros(capacity, dtype=np.uint32)
        self.child_count = np.zeros(capacity, dtype=np.uint32)
        self.pin_until = np.zeros(capacity, dtype=np.float64)
        self.deadline = np.zeros(capacity, dtype=np.float64)  # write deadline of a pending page
        self.epoch = np.zeros(capacity, dtype=np.uint32)  # bumped on free: detects recycled rows
        self.pend = np.full(capacity, -1, dtype=np.int64)  # row of the namespace's PendingTable
        # slot bytes per namespace id (rows find their slot size through their namespace)
        self.ns_slot_bytes = np.zeros(1 << 16, dtype=np.uint64)
        self.ns_rows = np.zeros(1 << 16, dtype=np.int64)
        self.tables: dict[int, KeyTable] = {}
        self.pending: dict[int, PendingTable] = {}
        self.high = 0  # rows [0, high) have been used; scans look at these only
        self._free = _FreeRows()

    # -- namespaces
    def add_namespace(self, ns_id: int, slot_bytes: int, num_layers: int, num_heads: int) -> None:
        self.tables[ns_id] = KeyTable(self)
        self.pending[ns_id] = PendingTable(num_layers, num_heads)
        self.ns_slot_bytes[ns_id] = slot_bytes

    def drop_namespace_table(self, ns_id: int) -> None:
        """Make every page of the namespace unmatchable at once (rows stay until freed)."""
        self.tables.pop(ns_id, None)

    def forget_namespace(self, ns_id: int) -> None:
        self.tables.pop(ns_id, None)
        self.pending.pop(ns_id, None)
        self.ns_slot_bytes[ns_id] = 0

    # -- sizes
    @property
    def capacity(self) -> int:
        return len(self.state)

    def __len__(self) -> int:
        return self.high - len(self._free)

    def row_bytes(self, rows: np.ndarray) -> np.ndarray:
        return self.ns_slot_bytes[self.ns[rows]]

    # -- lookups
    def lookup(self, ns_id: int, packed_keys: bytes) -> np.ndarray:
        """Row of each 16-byte key (-1: absent), in order."""
        count = len(packed_keys) // KEY_BYTES
        table = self.tables.get(ns_id)
        if table is None:
            return np.full(count, -1, dtype=np.int64)
        words = np.frombuffer(packed_keys, dtype=np.uint64, count=count * 2).reshape(count, 2)
        return table.find(words)

    def prefix_length(self, rows: np.ndarray, node_alive: np.ndarray) -> int:
        """Pages counted from page 0: present, complete, on a live node, parent = previous page."""
        if len(rows) == 0:
            return 0
        safe = np.where(rows >= 0, rows, 0)
        expected_parent = np.empty(len(rows), dtype=np.int64)
        expected_parent[0] = ROOT
        expected_parent[1:] = rows[:-1]
        ok = (
            (rows >= 0)
            & (self.state[safe] == COMPLETE)
            & node_alive[self.node[safe]]
            & (self.parent[safe] == expected_parent)
        )
        return len(rows) if ok.all() else int(np.argmin(ok))

    def keys_of(self, rows: np.ndarray) -> bytes:
        return self.keys[rows].tobytes()

    # -- rows
    def alloc(self, count: int) -> np.ndarray:
        """``count`` fresh rows (recycled first); columns reset, state FREE until the caller fills them."""
        taken = self._free.pop(count)
        fresh = count - len(taken)
        if self.high + fresh > self.capacity:
            self._grow(max(self.capacity * 2, self.high + fresh))
        rows = np.concatenate((taken, np.arange(self.high, self.high + fresh, dtype=np.int64)))
        self.high += fresh
        self.parent[rows] = ROOT
        self.layers_complete[rows] = 0
        self.lease_count[rows] = 0
        self.child_count[rows] = 0
        self.pin_until[rows] = 0.0
        self.deadline[rows] = 0.0
        self.pend[rows] = -1
        return rows

    def insert(
        self,
        ns_id: int,
        rows: np.ndarray,
        packed_keys: bytes,
        nodes: np.ndarray,
        slots: np.ndarray,
        generations: np.ndarray,
        now: float,
    ) -> None:
        """Fill freshly allocated rows as PENDING pages and make their keys findable."""
        table = self.tables[ns_id]
        _rows16(self.keys)[rows] = np.frombuffer(packed_keys, dtype=_V16)
        self.ns[rows] = ns_id
        self.node[rows] = nodes
        self.slot[rows] = slots
        self.generation[rows] = generations
        self.state[rows] = PENDING
        self.last_access[rows] = now
        self.pend[rows] = self.pending[ns_id].alloc(len(rows))
        table.insert(rows)
        self.ns_rows[ns_id] += len(rows)

    def complete(self, rows: np.ndarray, now: float) -> None:
        """Pending -> COMPLETE: coverage dropped, recency starts now."""
        ns_of = self.ns[rows]
        if len(rows) and bool((ns_of == ns_of[0]).all()):  # one namespace (one request): no unique
            self.pending[int(ns_of[0])].release(self.pend[rows])
        else:
            for ns_id in np.unique(ns_of).tolist():
                sel = rows[ns_of == ns_id]
                self.pending[ns_id].release(self.pend[sel])
        self.pend[rows] = -1
        self.state[rows] = COMPLETE
        self.last_access[rows] = now

    def release(self, rows: np.ndarray) -> None:
        """Return rows to the free list: keys unfindable, coverage dropped, epoch bumped.

        The caller has already freed the slots; parents' child counts and the
        children of these rows are handled by :meth:`unlink`.
        """
        if not len(rows):
            return
        ns_of = self.ns[rows]
        for ns_id in np.unique(ns_of).tolist():
            sel = rows[ns_of == ns_id]
            table = self.tables.get(ns_id)
            if table is not None:
                table.delete(sel)
            pending = self.pending.get(ns_id)
            pend = self.pend[sel]
            if pending is not None:
                pending.release(pend[pend >= 0])
            self.ns_rows[ns_id] -= len(sel)
        self.state[rows] = FREE
        self.pend[rows] = -1
        self.lease_count[rows] = 0
        self.child_count[rows] = 0
        self.epoch[rows] += np.uint32(1)
        self._free.push(rows)

    def unlink(self, rows: np.ndarray) -> int:
        """Before freeing ``rows``: parents lose a child, children become orphans. Returns orphans made."""
        parents = self.parent[rows]
        parents = parents[parents >= 0]
        if len(parents):
            np.subtract.at(self.child_count, parents, _ONE)
        with_children = rows[self.child_count[rows] > 0]
        if not len(with_children):
            return 0
        live = self.state[: self.high] != FREE
        orphans = np.flatnonzero(live & np.isin(self.parent[: self.high], with_children))
        self.parent[orphans] = ORPHAN
        return len(orphans)

    def rows_where(self, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask).astype(np.int64)

    def live_mask(self) -> np.ndarray:
        return self.state[: self.high] != FREE

    def valid(self, rows: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """Which remembered (row, epoch) pairs still name the same page."""
        return (self.epoch[rows] == epochs) & (self.state[rows] != FREE)

    def _grow(self, capacity: int) -> None:
        self.keys = _grow(self.keys, capacity)
        self.ns = _grow(self.ns, capacity)
        self.parent = _grow(self.parent, capacity, ROOT)
        self.node = _grow(self.node, capacity)
        self.slot = _grow(self.slot, capacity)
        self.generation = _grow(self.generation, capacity)
        self.state = _grow(self.state, capacity)
        self.layers_complete = _grow(self.layers_complete, capacity)
        self.last_access = _grow(self.last_access, capacity)
        self.lease_count = _grow(self.lease_count, capacity)
        self.child_count = _grow(self.child_count, capacity)
        self.pin_until = _grow(self.pin_until, capacity)
        self.deadline = _grow(self.deadline, capacity)
        self.epoch = _grow(self.epoch, capacity)
        self.pend = _grow(self.pend, capacity, -1)
