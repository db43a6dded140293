"""An asyncio face on :class:`KVStoreClient` for engines that run an event loop.

Each call runs the sync client in a worker thread (``asyncio.to_thread``):
the caller's loop never blocks on a copy or an RPC, the data plane still runs
outside any event loop, and the control calls still go through the client's
own loop thread.  Same arguments and results as the sync client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from kvstore.client.client import KVStoreClient, LeaseRef
from kvstore.client.types import Lease, PrefixHit
from kvstore.layout import Layout


class AsyncKVStoreClient:
    def __init__(self, address: str | None = None, namespace: str = "", **options: Any) -> None:
        self.sync = KVStoreClient(address, namespace, **options)

    async def __aenter__(self) -> AsyncKVStoreClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def create_namespace(
        self,
        page_size: int,
        num_layers: int,
        segment_bytes: int = 0,
        fingerprint: bytes = b"",
        **geometry: Any,
    ) -> Layout:
        return await asyncio.to_thread(
            self.sync.create_namespace, page_size, num_layers, segment_bytes, fingerprint, **geometry
        )

    async def delete_namespace(self) -> int:
        return await asyncio.to_thread(self.sync.delete_namespace)

    async def put_layer(
        self,
        tokens: Any,
        layer: int,
        kv: Any,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        contexts: Sequence[bytes] | None = None,
        reader_host: str = "",
    ) -> int:
        return await asyncio.to_thread(
            self.sync.put_layer,
            tokens,
            layer,
            kv,
            tp_rank,
            tp_size,
            contexts=contexts,
            reader_host=reader_host,
        )

    async def put_layers(
        self,
        tokens: Any,
        layers: Sequence[int],
        kv: Any,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        contexts: Sequence[bytes] | None = None,
        reader_host: str = "",
    ) -> int:
        return await asyncio.to_thread(
            self.sync.put_layers,
            tokens,
            layers,
            kv,
            tp_rank,
            tp_size,
            contexts=contexts,
            reader_host=reader_host,
        )

    async def abort(
        self, tokens: Any, tp_rank: int = 0, tp_size: int = 1, *, contexts: Sequence[bytes] | None = None
    ) -> int:
        return await asyncio.to_thread(self.sync.abort, tokens, tp_rank, tp_size, contexts=contexts)

    async def get_prefix(
        self,
        tokens: Any,
        layers: Sequence[int] | None = None,
        heads: tuple[int, int] | None = None,
        out: Any = None,
        *,
        lease: LeaseRef | None = None,
        contexts: Sequence[bytes] | None = None,
    ) -> PrefixHit:
        return await asyncio.to_thread(
            self.sync.get_prefix, tokens, layers, heads, out, lease=lease, contexts=contexts
        )

    async def match_prefix(self, tokens: Any, *, contexts: Sequence[bytes] | None = None) -> int:
        return await asyncio.to_thread(self.sync.match_prefix, tokens, contexts=contexts)

    async def acquire_prefix(
        self, tokens: Any, *, lease_ms: int = 0, contexts: Sequence[bytes] | None = None
    ) -> Lease:
        return await asyncio.to_thread(self.sync.acquire_prefix, tokens, lease_ms=lease_ms, contexts=contexts)

    async def release(self, lease: LeaseRef) -> bool:
        return await asyncio.to_thread(self.sync.release, lease)

    async def put_extra(self, tokens: Any, name: str, data: Any) -> None:
        await asyncio.to_thread(self.sync.put_extra, tokens, name, data)

    async def get_extra(self, tokens: Any, name: str) -> bytes | None:
        return await asyncio.to_thread(self.sync.get_extra, tokens, name)
