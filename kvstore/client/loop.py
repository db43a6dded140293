"""The sync client's private event loop.

gRPC work runs on a daemon thread with its own asyncio loop, so the sync client
works the same inside an engine that already runs asyncio (its loop is never
touched or blocked by ours) and in plain threads.  Callers submit coroutines
and wait for the result; the data plane stays in the calling thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from kvstore.errors import ErrorCode, KVStoreError

log = logging.getLogger("kvstore.client.loop")

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running forever on a daemon thread."""

    def __init__(self, name: str = "kvstore-client-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it; ``timeout_s`` is a backstop, RPCs carry their own deadline."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking kvstore call was made from the client's own event-loop thread")
        if not self.running:
            coro.close()
            raise KVStoreError(ErrorCode.UNAVAILABLE, "the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the coroutine's own TimeoutError
            future.cancel()
            raise KVStoreError(
                ErrorCode.DEADLINE, f"client call did not finish within {timeout_s:.1f} s"
            ) from None

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop without waiting for it (pipelined calls); the caller collects the future."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a kvstore call was submitted from the client's own event-loop thread")
        if not self.running:
            coro.close()
            raise KVStoreError(ErrorCode.UNAVAILABLE, "the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout_s: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("client event loop did not stop within %.1f s", timeout_s)
