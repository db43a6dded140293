"""An asyncio face on :class:`KVStoreClient` for engines that run an event loop.

Each call runs the sync client in a worker thread (``asyncio.to_thread``):
the caller's loop never blocks on a copy or an RPC, the data plane still runs
outside any event loop, and the control calls still go through the client's
own loop thread.  Same arguments and results as the sync client.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from kvstore.client.client import KVStoreClient
from kvstore.client.stream import AsyncPrefixStream

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _in_thread(
    method: Callable[Concatenate[KVStoreClient, _P], _R],
) -> Callable[Concatenate[AsyncKVStoreClient, _P], Coroutine[Any, Any, _R]]:
    """The async twin of a sync client method: same arguments, docstring and result, run in a worker thread."""
    name = method.__name__

    async def run_in_thread(self: AsyncKVStoreClient, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        # Looked up on the instance at call time, exactly as a hand-written wrapper would.
        bound: Callable[_P, _R] = getattr(self.sync, name)
        return await asyncio.to_thread(bound, *args, **kwargs)

    run_in_thread.__name__ = name
    run_in_thread.__qualname__ = f"AsyncKVStoreClient.{name}"
    run_in_thread.__doc__ = method.__doc__
    run_in_thread.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return run_in_thread


class AsyncKVStoreClient:
    def __init__(self, address: str | None = None, namespace: str = "", **options: Any) -> None:
        self.sync = KVStoreClient(address, namespace, **options)

    async def __aenter__(self) -> AsyncKVStoreClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    close = _in_thread(KVStoreClient.close)
    create_namespace = _in_thread(KVStoreClient.create_namespace)
    delete_namespace = _in_thread(KVStoreClient.delete_namespace)
    put_layer = _in_thread(KVStoreClient.put_layer)
    put_layers = _in_thread(KVStoreClient.put_layers)
    abort = _in_thread(KVStoreClient.abort)
    get_prefix = _in_thread(KVStoreClient.get_prefix)
    match_prefix = _in_thread(KVStoreClient.match_prefix)
    acquire_prefix = _in_thread(KVStoreClient.acquire_prefix)
    pin_prefix = _in_thread(KVStoreClient.pin_prefix)
    unpin_prefix = _in_thread(KVStoreClient.unpin_prefix)
    release = _in_thread(KVStoreClient.release)
    put_extra = _in_thread(KVStoreClient.put_extra)
    get_extra = _in_thread(KVStoreClient.get_extra)
    flush = _in_thread(KVStoreClient.flush)

    def put_layer_async(
        self, tokens: Any, layer: int, kv: Any, *args: Any, **kwargs: Any
    ) -> asyncio.Future[int]:
        """KVStoreClient.put_layer_async (same arguments): queued at once; await the future for the pages written."""
        return asyncio.wrap_future(self.sync.put_layer_async(tokens, layer, kv, *args, **kwargs))

    def open_put(self, tokens: Any, *args: Any, **kwargs: Any) -> asyncio.Future[int]:
        """KVStoreClient.open_put (same arguments): the put's session opens in the background; await for its pages."""
        return asyncio.wrap_future(self.sync.open_put(tokens, *args, **kwargs))

    async def get_prefix_stream(self, tokens: Any, *args: Any, **kwargs: Any) -> AsyncPrefixStream:
        """KVStoreClient.get_prefix_stream, iterated with ``async for``; same arguments."""
        return AsyncPrefixStream(
            await asyncio.to_thread(self.sync.get_prefix_stream, tokens, *args, **kwargs)
        )
