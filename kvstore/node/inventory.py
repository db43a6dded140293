"""What each slot of the node holds, so that a new leader can rebuild its index from nodes.

One row per assigned slot, stored column-wise in numpy arrays (namespace,
page key, parent key, slot size, generation), found through a dense i32 table
indexed like the pool's generation table (one entry per 4 KiB unit), plus a
dense u32 table of slot sizes (in 4 KiB units, 0 = free) so the data server
can bound-check a whole request with one numpy gather.  Committed shards
(slot, layer, head range, checksum) go to an append-only log of numpy chunks,
one per update batch; an entry counts while its row still holds the same
assignment (the row's epoch), and a bounded sweep on every update drops the
entries of freed or reassigned slots.  Every update is a handful of numpy
calls whatever its size: a 2048-page request of 32 layers is 65,536 commits,
which a Python object per shard made cost the node ~30 ms of event-loop time
per request and ~1 KiB per slot.

The records are written on the node's event loop (slot updates from the
master); data-server threads only read the dense tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.base import SLOT_UNIT

KEY_BYTES = 16
_V16 = np.dtype("V16")  # one key as one item


@dataclass(slots=True)
class SlotRecord:
    """One assigned slot: which page it holds and which shards of which layers are committed."""

    namespace: str
    key: bytes
    parent: bytes
    slot_bytes: int
    generation: int
    # layer -> [(head_begin, head_end, checksum)], one entry per committed shard
    layers: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)


def _grow(array: np.ndarray, capacity: int, fill: int = 0) -> np.ndarray:
    grown = np.full((capacity,) + array.shape[1:], fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


@dataclass
class _CommitChunk:
    rows: np.ndarray  # i32
    epochs: np.ndarray  # u32: the row's epoch when committed
    layers: np.ndarray  # u16
    begins: np.ndarray  # u16
    ends: np.ndarray  # u16
    checksums: np.ndarray  # u64

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, mask: np.ndarray) -> _CommitChunk:
        return _CommitChunk(
            self.rows[mask],
            self.epochs[mask],
            self.layers[mask],
            self.begins[mask],
            self.ends[mask],
            self.checksums[mask],
        )


_CHUNK_FIELDS = ("rows", "epochs", "layers", "begins", "ends", "checksums")
MERGE_ENTRIES = 16_384  # rows of the log's open tail chunk, which smaller commits fill


class Inventory:
    """Slot records of one tier region of ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes % SLOT_UNIT:
            raise ValueError(f"capacity {capacity_bytes} is not a multiple of {SLOT_UNIT}")
        self.capacity_bytes = capacity_bytes
        units = capacity_bytes // SLOT_UNIT
        # slot_bytes // SLOT_UNIT of the slot starting at each unit; 0 where no slot starts.
        self._slot_units = np.zeros(units, dtype=np.uint32)
        # record row of the slot starting at each unit; -1 where none
        self._row_of_unit = np.full(units, -1, dtype=np.int32)
        capacity = 1024
        self._slot = np.zeros(capacity, dtype=np.uint64)
        self._generation = np.zeros(capacity, dtype=np.uint32)
        self._size = np.zeros(capacity, dtype=np.uint64)
        self._ns = np.zeros(capacity, dtype=np.uint16)
        self._key = np.zeros((capacity, KEY_BYTES), dtype=np.uint8)
        self._parent = np.zeros((capacity, KEY_BYTES), dtype=np.uint8)
        self._epoch = np.zeros(capacity, dtype=np.uint32)  # bumped when the row is freed or reassigned
        self._live = np.zeros(capacity, dtype=bool)
        self._high = 0
        self._free_rows: list[int] = []
        self._namespaces: list[str] = []
        self._ns_index: dict[str, int] = {}
        self._log: list[_CommitChunk] = []
        # the log's open tail: preallocated columns (MERGE_ENTRIES rows), how many are filled, and
        # the chunk (views of them) that stands for it as the log's last entry
        self._tail: _CommitChunk | None = None
        self._tail_filled = 0
        self._tail_chunk: _CommitChunk | None = None
        self._sweep_at = 0  # next chunk the sweep looks at
        self.used_bytes = 0
        # The highest slot generation this region has been given (assignments and frees alike), so a
        # new leader can number every slot above anything a reader may still hold.
        self.highest_generation = 0

    def note_generations(self, generations: np.ndarray) -> None:
        if len(generations):
            self.highest_generation = max(self.highest_generation, int(generations.max()))

    def __len__(self) -> int:
        return self._high - len(self._free_rows)

    @property
    def log_entries(self) -> int:
        return sum(len(c) for c in self._log)

    def get(self, slot_offset: int) -> SlotRecord | None:
        """The record of one slot (built on demand: for tests and tools, not for hot paths)."""
        if slot_offset % SLOT_UNIT or not 0 <= slot_offset < self.capacity_bytes:
            return None
        row = int(self._row_of_unit[slot_offset // SLOT_UNIT])
        if row < 0:
            return None
        layers: dict[int, list[tuple[int, int, int]]] = {}
        for layer, begin, end, checksum in self._shards(np.array([row])):
            layers.setdefault(layer, []).append((begin, end, checksum))
        return SlotRecord(
            namespace=self._namespaces[int(self._ns[row])],
            key=self._key[row].tobytes(),
            parent=self._parent[row].tobytes(),
            slot_bytes=int(self._size[row]),
            generation=int(self._generation[row]),
            layers=layers,
        )

    def _valid_log(self) -> _CommitChunk:
        """Every log entry that still counts, the last one kept where a shard was committed twice."""
        if not self._log:
            empty = np.zeros(0, dtype=np.uint16)
            return _CommitChunk(
                np.zeros(0, np.int32), np.zeros(0, np.uint32), empty, empty, empty, np.zeros(0, np.uint64)
            )
        log = _CommitChunk(*(np.concatenate([getattr(c, f) for c in self._log]) for f in _CHUNK_FIELDS))
        log = log.take(self._counts(log))
        # a shard committed again replaces its checksum: keep the last entry of each (row, layer, heads)
        order = np.lexsort((np.arange(len(log))[::-1], log.ends, log.begins, log.layers, log.rows))
        sorted_log = log.take(order)
        first = np.ones(len(sorted_log), dtype=bool)
        if len(sorted_log) > 1:
            first[1:] = (
                (np.diff(sorted_log.rows) != 0)
                | (np.diff(sorted_log.layers.astype(np.int32)) != 0)
                | (np.diff(sorted_log.begins.astype(np.int32)) != 0)
                | (np.diff(sorted_log.ends.astype(np.int32)) != 0)
            )
        return sorted_log.take(first)

    def _shards(self, rows: np.ndarray) -> list[tuple[int, int, int, int]]:
        log = self._valid_log()
        mine = log.take(np.isin(log.rows, rows))
        order = np.lexsort((mine.ends, mine.begins, mine.layers))
        mine = mine.take(order)
        return list(
            zip(
                mine.layers.tolist(),
                mine.begins.tolist(),
                mine.ends.tolist(),
                mine.checksums.tolist(),
                strict=True,
            )
        )

    def _counts(self, chunk: _CommitChunk) -> np.ndarray:
        """Which entries of ``chunk`` still belong to their row's current assignment."""
        rows = chunk.rows.astype(np.int64)
        return self._live[rows] & (self._epoch[rows] == chunk.epochs)

    # -- checks shared by the service and the data server
    def check_slots(self, slot_offsets: np.ndarray, what: str) -> None:
        """Every offset must be a 4 KiB-aligned offset inside the region."""
        if len(slot_offsets) == 0:
            return
        if np.any(slot_offsets % SLOT_UNIT) or int(slot_offsets.max()) >= self.capacity_bytes:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what}: slot offsets must be {SLOT_UNIT}-byte aligned and below the region size {self.capacity_bytes}",
            )

    def slot_bytes_of(self, slot_offsets: np.ndarray) -> np.ndarray:
        """Size (u64) of each slot as assigned; 0 for a free slot.  Offsets must pass check_slots."""
        return self._slot_units[slot_offsets // SLOT_UNIT].astype(np.uint64) * SLOT_UNIT

    # -- slot updates from the master (applied in this order: assign, commit, free)
    def assign(
        self,
        slot_offsets: np.ndarray,
        generations: np.ndarray,
        keys: bytes,
        parents: bytes,
        slot_bytes: np.ndarray,
        namespaces: list[str],
    ) -> int:
        """Record that each slot now holds (namespace, key, parent) at ``generation``.

        A repeated assignment at the same generation (a retried batch) keeps the
        record and its commits; another generation replaces it.
        """
        n = len(slot_offsets)
        if len(keys) != n * KEY_BYTES or len(parents) != n * KEY_BYTES:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, "assignment keys/parents must be 16 bytes per slot"
            )
        self.check_slots(slot_offsets, "assignment")
        if n and (
            np.any(slot_bytes == 0)
            or np.any(slot_bytes % SLOT_UNIT)
            or np.any(slot_bytes > self.capacity_bytes - slot_offsets)
        ):
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"assignment: slot sizes must be positive multiples of {SLOT_UNIT} that fit the region",
            )
        if n == 0:
            return 0
        units = (slot_offsets // SLOT_UNIT).astype(np.int64)
        # keys as 16-byte items: fancy indexing moves each as one item (~3x faster than [n, 16] u8)
        key_rows = np.frombuffer(keys, dtype=_V16)
        parent_rows = np.frombuffer(parents, dtype=_V16)
        if namespaces.count(namespaces[0]) == n:  # the usual batch: one request of one namespace
            ns_ids = np.full(n, self._namespace_id(namespaces[0]), dtype=np.uint16)
        else:
            ns_ids = np.array([self._namespace_id(name) for name in namespaces], dtype=np.uint16)
        rounds: list[slice | np.ndarray]
        if n == 1 or bool((units[1:] > units[:-1]).all()):  # ascending: every slot once (the usual)
            rounds = [slice(None)]
        else:
            # A slot named twice in one batch (never sent by a master, but cheap to get right):
            # apply the k-th naming of every slot in round k, as if the batch ran in order.
            order = np.argsort(units, kind="stable")
            sorted_units = units[order]
            starts = np.flatnonzero(np.r_[True, sorted_units[1:] != sorted_units[:-1]])
            rank = np.empty(n, dtype=np.int64)
            rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
            rounds = [np.flatnonzero(rank == k) for k in range(int(rank.max()) + 1)]
        for pick in rounds:
            self._assign_distinct(
                units[pick],
                generations[pick].astype(np.uint32),
                slot_bytes[pick].astype(np.uint64),
                ns_ids[pick],
                key_rows[pick],
                parent_rows[pick],
            )
        self._slot_units[units] = slot_bytes // SLOT_UNIT
        self._sweep(n)
        return n

    def _assign_distinct(
        self,
        units: np.ndarray,
        gens: np.ndarray,
        sizes: np.ndarray,
        ns_ids: np.ndarray,
        key_rows: np.ndarray,
        parent_rows: np.ndarray,
    ) -> None:
        rows = self._row_of_unit[units].astype(np.int64)
        held = rows >= 0
        same = np.zeros(len(units), dtype=bool)
        same[held] = self._generation[rows[held]] == gens[held]
        # a retried batch (same generation) keeps the record and its commits
        replace = held & ~same
        if replace.any():
            old = rows[replace]
            self.used_bytes -= int(self._size[old].sum())
            self._epoch[old] += np.uint32(1)  # its commits stop counting
        fresh = ~held
        if fresh.any():
            rows[fresh] = self._alloc_rows(int(np.count_nonzero(fresh)))
        if same.any():
            write = ~same
            units, gens, sizes, ns_ids = units[write], gens[write], sizes[write], ns_ids[write]
            key_rows, parent_rows, rows = key_rows[write], parent_rows[write], rows[write]
        target = rows
        self._slot[target] = units.astype(np.uint64) * SLOT_UNIT
        self._generation[target] = gens
        self._size[target] = sizes
        self._ns[target] = ns_ids
        self._key.view(_V16).reshape(-1)[target] = key_rows
        self._parent.view(_V16).reshape(-1)[target] = parent_rows
        self._live[target] = True
        self._row_of_unit[units] = target.astype(np.int32)
        self.used_bytes += int(sizes.sum())

    def _namespace_id(self, name: str) -> int:
        ns_id = self._ns_index.get(name)
        if ns_id is None:
            ns_id = self._ns_index[name] = len(self._namespaces)
            self._namespaces.append(name)
        return ns_id

    def _alloc_rows(self, count: int) -> np.ndarray:
        reuse = min(count, len(self._free_rows))
        taken = self._free_rows[len(self._free_rows) - reuse :]
        del self._free_rows[len(self._free_rows) - reuse :]
        fresh = count - reuse
        if self._high + fresh > len(self._slot):
            capacity = max(len(self._slot) * 2, self._high + fresh)
            self._slot = _grow(self._slot, capacity)
            self._generation = _grow(self._generation, capacity)
            self._size = _grow(self._size, capacity)
            self._ns = _grow(self._ns, capacity)
            self._key = _grow(self._key, capacity)
            self._parent = _grow(self._parent, capacity)
            self._epoch = _grow(self._epoch, capacity)
            self._live = _grow(self._live, capacity)
        rows = np.concatenate(
            (np.array(taken, dtype=np.int64), np.arange(self._high, self._high + fresh, dtype=np.int64))
        )
        self._high += fresh
        return rows

    def commit(
        self,
        slot_offsets: np.ndarray,
        layers: np.ndarray,
        head_begin: np.ndarray,
        head_end: np.ndarray,
        checksums: np.ndarray,
    ) -> int:
        """Record committed shards; returns how many referred to an assigned slot.

        A shard committed again (a retried batch) replaces its checksum rather
        than adding a second entry.
        """
        if not len(slot_offsets):
            return 0
        rows = self._row_of_unit[(np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT).astype(np.int64)]
        known = rows >= 0
        applied = int(np.count_nonzero(known))
        if applied:
            rows = rows[known].astype(np.int64)
            chunk = _CommitChunk(
                rows.astype(np.int32),
                self._epoch[rows].copy(),
                np.asarray(layers, dtype=np.uint16)[known],
                np.asarray(head_begin, dtype=np.uint16)[known],
                np.asarray(head_end, dtype=np.uint16)[known],
                np.asarray(checksums, dtype=np.uint64)[known],
            )
            self._append(chunk)
        self._sweep(applied)
        return applied

    def _append(self, chunk: _CommitChunk) -> None:
        """Add commits to the log; small ones fill the open tail chunk.

        A layer of a small request is a few hundred entries: as chunks of their own, the
        log's per-chunk work (its sweep, a snapshot) would grow with every commit.  The tail
        is a view of preallocated columns of MERGE_ENTRIES rows, so filling it copies only
        the new entries; once the sweep replaces or drops it, the next commit opens a new one.
        """
        k = len(chunk)
        tail, filled = self._tail, self._tail_filled
        open_tail = tail is not None and bool(self._log) and self._log[-1] is self._tail_chunk
        if open_tail and filled + k <= MERGE_ENTRIES:
            assert tail is not None
        elif k < MERGE_ENTRIES:
            tail = self._tail = _CommitChunk(
                *(np.empty(MERGE_ENTRIES, dtype=getattr(chunk, f).dtype) for f in _CHUNK_FIELDS)
            )
            filled = 0
            self._log.append(chunk)  # replaced by the tail's view below
        else:
            self._log.append(chunk)
            return
        for f in _CHUNK_FIELDS:
            getattr(tail, f)[filled : filled + k] = getattr(chunk, f)
        self._tail_filled = filled + k
        self._tail_chunk = _CommitChunk(*(getattr(tail, f)[: filled + k] for f in _CHUNK_FIELDS))
        self._log[-1] = self._tail_chunk

    def free(self, slot_offsets: np.ndarray) -> int:
        """Forget what the slots held; returns how many were assigned."""
        self.check_slots(slot_offsets, "free")
        if not len(slot_offsets):
            return 0
        units = np.unique((slot_offsets // SLOT_UNIT).astype(np.int64))
        rows = self._row_of_unit[units].astype(np.int64)
        rows = rows[rows >= 0]
        self.used_bytes -= int(self._size[rows].sum())
        self._live[rows] = False
        self._epoch[rows] += np.uint32(1)  # its commits stop counting
        self._row_of_unit[units] = -1
        self._free_rows.extend(rows.tolist())
        self._slot_units[slot_offsets // SLOT_UNIT] = 0
        self._sweep(len(rows))
        return len(rows)

    def _sweep(self, work: int) -> None:
        """Drop log entries that no longer count, a bounded number of chunks per update.

        Looks at no fewer entries than twice what the update added, so the
        sweep goes round the whole log while it at most doubles; at least one
        chunk, and chunks are at least MERGE_ENTRIES long as they are made, so a
        small update costs one chunk's pass.
        """
        budget = 2 * work
        log = self._log
        seen = 0
        i = self._sweep_at if self._sweep_at < len(log) else 0
        start_len = len(log)
        visited = 0
        while log and seen < budget and visited < start_len:
            if i >= len(log):
                i = 0
            chunk = log[i]
            seen += len(chunk)
            visited += 1
            keep = self._counts(chunk)
            if keep.all():
                i += 1
            elif keep.any():
                log[i] = chunk.take(keep)
                i += 1
            else:
                del log[i]
        self._sweep_at = i

    # -- rebuild support
    def snapshot(self, term: int) -> pb.SlotUpdates:
        """Every assigned slot as assignments plus layer commits, the form a new leader replays.

        The free table holds one record: slot 0 with the highest generation the region
        has used (``highest_generation``), from which a new leader numbers upwards.  It
        frees nothing; kvstore.master.rebuild reads it as that floor.
        """
        rows = np.flatnonzero(self._live[: self._high])
        msg = self._records(rows, term)
        if self.highest_generation:
            msg.free_slots = np.zeros(1, dtype="<u8").tobytes()
            msg.free_generations = np.array([self.highest_generation], dtype="<u4").tobytes()
        return msg

    def describe(self, slot_offsets: np.ndarray, term: int = 0) -> pb.SlotUpdates:
        """Assignments and commits of the named slots (unassigned ones left out): what a copy needs."""
        self.check_slots(slot_offsets, "describe")
        rows = self._row_of_unit[(np.asarray(slot_offsets, dtype=np.uint64) // SLOT_UNIT).astype(np.int64)]
        return self._records(np.unique(rows[rows >= 0]).astype(np.int64), term)

    def _records(self, rows: np.ndarray, term: int) -> pb.SlotUpdates:
        """Rows as assignments plus their valid layer commits, in slot order."""
        order = np.argsort(self._slot[rows], kind="stable")
        rows = rows[order]
        used_ns = np.unique(self._ns[rows]) if len(rows) else np.zeros(0, np.uint16)
        remap = np.zeros(max(len(self._namespaces), 1), dtype=np.uint16)
        remap[used_ns] = np.arange(len(used_ns), dtype=np.uint16)
        names = [self._namespaces[int(i)] for i in used_ns]
        slots = self._slot[rows].astype("<u8")
        gens = self._generation[rows].astype("<u4")
        sizes = self._size[rows].astype("<u8")
        ns_rows = remap[self._ns[rows]].astype("<u2")
        log = self._valid_log()
        log = log.take(np.isin(log.rows, rows))
        commits = np.zeros((len(log), 5), dtype=np.uint64)
        commits[:, 0] = self._slot[log.rows.astype(np.int64)]
        commits[:, 1] = log.layers
        commits[:, 2] = log.begins
        commits[:, 3] = log.ends
        commits[:, 4] = log.checksums
        return pb.SlotUpdates(
            term=term,
            namespaces=names,
            assign_slots=slots.tobytes(),
            assign_generations=gens.tobytes(),
            assign_keys=self._key[rows].tobytes(),
            assign_parents=self._parent[rows].tobytes(),
            assign_slot_bytes=sizes.tobytes(),
            assign_ns_index=ns_rows.tobytes(),
            commit_slots=commits[:, 0].astype("<u8").tobytes(),
            commit_layers=commits[:, 1].astype("<u2").tobytes(),
            commit_heads=commits[:, 2:4].astype("<u2").tobytes(),
            commit_checksums=commits[:, 4].astype("<u8").tobytes(),
        )
