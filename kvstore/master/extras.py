"""Extras: small named blobs keyed by the digest of a whole token sequence (DESIGN.md, "Extras").

Kept in the master's memory, least recently used first out once their total
size passes the budget.  They are hints (a first generated token, a hidden
state): losing one costs a recomputation, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict

ExtraKey = tuple[str, bytes, str]  # (namespace, sequence digest, name)


class ExtrasStore:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._items: OrderedDict[ExtraKey, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, namespace: str, digest: bytes, name: str, data: bytes) -> None:
        key = (namespace, digest, name)
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= self._cost(key, old)
        if self._cost(key, data) > self.budget_bytes:
            return  # larger than the whole budget: not kept (a miss later, never an error)
        self._items[key] = data
        self.bytes += self._cost(key, data)
        while self.bytes > self.budget_bytes:
            old_key, old_data = self._items.popitem(last=False)
            self.bytes -= self._cost(old_key, old_data)

    def get(self, namespace: str, digest: bytes, name: str) -> bytes | None:
        key = (namespace, digest, name)
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def drop_namespace(self, namespace: str) -> int:
        doomed = [k for k in self._items if k[0] == namespace]
        for key in doomed:
            self.bytes -= self._cost(key, self._items.pop(key))
        return len(doomed)

    @staticmethod
    def _cost(key: ExtraKey, data: bytes) -> int:
        # the blob plus a rough per-entry overhead, so many tiny extras also count
        return len(data) + len(key[1]) + len(key[2]) + 64
