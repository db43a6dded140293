"""Inventory: numpy records and a commit log that behave like one record per slot, whatever the batch."""

from __future__ import annotations

import numpy as np

from kvstore.node.inventory import Inventory

UNIT = 4096


class Model:
    """The inventory's contract in plain Python: slot -> (ns, key, generation, {(layer, b, e): checksum})."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[str, bytes, int, dict[tuple[int, int, int], int]]] = {}

    def assign(self, slots: list[int], gens: list[int], keys: bytes, names: list[str]) -> None:
        for i, (slot, gen) in enumerate(zip(slots, gens, strict=True)):
            old = self.slots.get(slot)
            if old is not None and old[2] == gen:
                continue  # a retried assignment keeps the record and its commits
            self.slots[slot] = (names[i], keys[16 * i : 16 * (i + 1)], gen, {})

    def commit(self, rows: list[tuple[int, int, int, int, int]]) -> int:
        applied = 0
        for slot, layer, begin, end, checksum in rows:
            if slot in self.slots:
                self.slots[slot][3][(layer, begin, end)] = checksum
                applied += 1
        return applied

    def free(self, slots: list[int]) -> int:
        return sum(self.slots.pop(slot, None) is not None for slot in set(slots))


def test_inventory_matches_the_model_through_random_batches() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        inv, model = Inventory(64 * UNIT), Model()
        for _ in range(60):
            slots = (rng.integers(0, 64, int(rng.integers(1, 10))) * UNIT).tolist()  # repeats happen
            kind = int(rng.integers(0, 3))
            if kind == 0:
                gens = rng.integers(1, 4, len(slots)).tolist()
                keys = rng.integers(0, 256, 16 * len(slots), dtype=np.uint8).tobytes()
                names = [str(rng.choice(["a", "b"])) for _ in slots]
                inv.assign(
                    np.array(slots, np.uint64),
                    np.array(gens, np.uint32),
                    keys,
                    keys,
                    np.full(len(slots), UNIT, np.uint64),
                    names,
                )
                model.assign(slots, gens, keys, names)
            elif kind == 1:
                rows = [
                    (s, int(rng.integers(0, 3)), b, b + 1, int(rng.integers(0, 1 << 60)))
                    for s in slots
                    for b in [int(rng.integers(0, 2))]
                ]
                table = np.array(rows, dtype=np.uint64).reshape(-1, 5)
                got = inv.commit(table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4])
                assert got == model.commit(rows)
            else:
                assert inv.free(np.array(slots, np.uint64)) == model.free(slots)
            assert len(inv) == len(model.slots) and inv.used_bytes == UNIT * len(model.slots)
        for slot in range(0, 64 * UNIT, UNIT):
            record, want = inv.get(slot), model.slots.get(slot)
            assert (record is None) == (want is None)
            if record is not None and want is not None:
                assert (record.namespace, record.key, record.generation) == want[:3]
                shards = {(layer, b, e): c for layer, entries in record.layers.items() for b, e, c in entries}
                assert shards == want[3]
        snap = inv.snapshot(term=1)
        assert sorted(np.frombuffer(snap.assign_slots, "<u8").tolist()) == sorted(model.slots)
        commits = sorted(
            zip(
                np.frombuffer(snap.commit_slots, "<u8").tolist(),
                np.frombuffer(snap.commit_layers, "<u2").tolist(),
                np.frombuffer(snap.commit_checksums, "<u8").tolist(),
                strict=True,
            )
        )
        assert commits == sorted(
            (slot, layer, c) for slot, rec in model.slots.items() for (layer, _, _), c in rec[3].items()
        )


def test_commit_log_sheds_freed_slots() -> None:
    inv = Inventory(4096 * UNIT)
    slots = np.arange(2048, dtype=np.uint64) * UNIT
    for round_ in range(6):
        inv.assign(
            slots,
            np.full(2048, round_ + 1, np.uint32),
            bytes(16 * 2048),
            bytes(16 * 2048),
            np.full(2048, UNIT, np.uint64),
            ["ns"] * 2048,
        )
        for layer in range(32):
            inv.commit(
                slots,
                np.full(2048, layer, np.uint16),
                np.zeros(2048, np.uint16),
                np.ones(2048, np.uint16),
                slots,
            )
        inv.free(slots)
    # what is left of six rounds of 65,536 commits is at most the sweep's reach, not their sum
    assert inv.log_entries <= 2 * 65_536
    assert len(inv) == 0 and inv.snapshot(term=1).commit_slots == b""
