"""Small thread-safe LRU maps for values derived on a hot path and asked for again soon.

:class:`LruMemo` maps keys to values (the client's page keys per token digest, its leased
batches); :class:`IdentityMemo` maps objects by identity (the GPU plane's tables per node
batch: a put session's batch is the same object for every layer) and holds each object, so
that its id cannot be reused by another while remembered.
"""

from __future__ import annotations

import collections
import threading
from typing import Any


class LruMemo:
    """The last ``size`` (key, value) pairs put; ``get`` refreshes a key's place."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The value put for ``key``, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class IdentityMemo:
    """Values derived from objects, remembered by the objects' identity (not equality)."""

    def __init__(self, size: int) -> None:
        self._memo = LruMemo(size)

    def get(self, obj: Any) -> Any:
        """The value put for this very object, or None."""
        hit = self._memo.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else None

    def put(self, obj: Any, value: Any) -> None:
        self._memo.put(id(obj), (obj, value))
