"""In-process metadata backend for a single machine: no durability beyond the master process.

The master that holds it is the only master, so it leads from term 1.
"""

from __future__ import annotations

import asyncio

from kvstore.metadata.base import Leadership, MetadataBackend


class EmbeddedBackend(MetadataBackend):
    def __init__(self) -> None:
        self._namespaces: dict[str, bytes] = {}
        self._values: dict[str, bytes] = {}
        self._lock = asyncio.Lock()

    async def get_namespace(self, name: str) -> bytes | None:
        return self._namespaces.get(name)

    async def put_namespace_if_absent(self, name: str, spec: bytes) -> bytes | None:
        async with self._lock:
            existing = self._namespaces.get(name)
            if existing is None:
                self._namespaces[name] = spec
            return existing

    async def delete_namespace(self, name: str) -> bool:
        async with self._lock:
            return self._namespaces.pop(name, None) is not None

    async def list_namespaces(self) -> dict[str, bytes]:
        return dict(self._namespaces)

    async def get_or_create(self, key: str, value: bytes) -> bytes:
        async with self._lock:
            return self._values.setdefault(key, value)

    async def campaign(self, address: str) -> Leadership:
        return Leadership(term=1, leader_address=address)

    async def still_leader(self, leadership: Leadership) -> bool:
        return True

    async def close(self) -> None:
        return None
