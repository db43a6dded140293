"""What each slot of the node holds, so that a new leader can rebuild its index from nodes.

One small record per assigned slot (namespace, page key, parent key, slot size,
generation, committed head ranges with their checksums per layer), plus a dense
u32 table of slot sizes (in 4 KiB units, 0 = free) indexed like the pool's
generation table, so the data server can bound-check a whole request with one
numpy gather instead of a dict lookup per range.

The records are written on the node's event loop (slot updates from the
master); data-server threads only read the dense table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.base import SLOT_UNIT

KEY_BYTES = 16


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


class Inventory:
    """Slot records of one tier region of ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes % SLOT_UNIT:
            raise ValueError(f"capacity {capacity_bytes} is not a multiple of {SLOT_UNIT}")
        self.capacity_bytes = capacity_bytes
        self._records: dict[int, SlotRecord] = {}
        # slot_bytes // SLOT_UNIT of the slot starting at each unit; 0 where no slot starts.
        self._slot_units = np.zeros(capacity_bytes // SLOT_UNIT, dtype=np.uint32)
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def get(self, slot_offset: int) -> SlotRecord | None:
        return self._records.get(slot_offset)

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
        records = self._records
        for i, (slot, gen, size, ns) in enumerate(
            zip(slot_offsets.tolist(), generations.tolist(), slot_bytes.tolist(), namespaces, strict=True)
        ):
            old = records.get(slot)
            if old is not None:
                if old.generation == gen:
                    continue
                self.used_bytes -= old.slot_bytes
            records[slot] = SlotRecord(
                namespace=sys.intern(ns),
                key=keys[i * KEY_BYTES : (i + 1) * KEY_BYTES],
                parent=parents[i * KEY_BYTES : (i + 1) * KEY_BYTES],
                slot_bytes=size,
                generation=gen,
            )
            self.used_bytes += size
        self._slot_units[slot_offsets // SLOT_UNIT] = slot_bytes // SLOT_UNIT
        return n

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
        applied = 0
        records = self._records
        for slot, layer, begin, end, checksum in zip(
            slot_offsets.tolist(),
            layers.tolist(),
            head_begin.tolist(),
            head_end.tolist(),
            checksums.tolist(),
            strict=True,
        ):
            record = records.get(slot)
            if record is None:
                continue
            shards = record.layers.setdefault(layer, [])
            for j, (b, e, _) in enumerate(shards):
                if b == begin and e == end:
                    shards[j] = (begin, end, checksum)
                    break
            else:
                shards.append((begin, end, checksum))
            applied += 1
        return applied

    def free(self, slot_offsets: np.ndarray) -> int:
        """Forget what the slots held; returns how many were assigned."""
        self.check_slots(slot_offsets, "free")
        freed = 0
        for slot in slot_offsets.tolist():
            record = self._records.pop(slot, None)
            if record is not None:
                self.used_bytes -= record.slot_bytes
                freed += 1
        self._slot_units[slot_offsets // SLOT_UNIT] = 0
        return freed

    # -- rebuild support
    def snapshot(self, term: int) -> pb.SlotUpdates:
        """Every assigned slot as assignments plus layer commits, the form a new leader replays."""
        items = list(self._records.items())
        ns_index: dict[str, int] = {}
        slots = np.empty(len(items), dtype="<u8")
        gens = np.empty(len(items), dtype="<u4")
        sizes = np.empty(len(items), dtype="<u8")
        ns_rows = np.empty(len(items), dtype="<u2")
        keys: list[bytes] = []
        parents: list[bytes] = []
        commit_rows: list[tuple[int, int, int, int, int]] = []
        for i, (slot, record) in enumerate(items):
            slots[i] = slot
            gens[i] = record.generation
            sizes[i] = record.slot_bytes
            ns_rows[i] = ns_index.setdefault(record.namespace, len(ns_index))
            keys.append(record.key)
            parents.append(record.parent)
            for layer, shards in list(record.layers.items()):
                for begin, end, checksum in list(shards):
                    commit_rows.append((slot, layer, begin, end, checksum))
        commits = np.array(commit_rows, dtype=np.uint64).reshape(-1, 5)
        return pb.SlotUpdates(
            term=term,
            namespaces=list(ns_index),
            assign_slots=slots.tobytes(),
            assign_generations=gens.tobytes(),
            assign_keys=b"".join(keys),
            assign_parents=b"".join(parents),
            assign_slot_bytes=sizes.tobytes(),
            assign_ns_index=ns_rows.tobytes(),
            commit_slots=commits[:, 0].astype("<u8").tobytes(),
            commit_layers=commits[:, 1].astype("<u2").tobytes(),
            commit_heads=commits[:, 2:4].astype("<u2").tobytes(),
            commit_checksums=commits[:, 4].astype("<u8").tobytes(),
        )
