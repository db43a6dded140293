"""Streaming reads of a prefix that is still being written (issue 5, "Layer streaming").

:meth:`KVStoreClient.get_prefix_stream` opens a ``StreamPrefix`` server stream on
the client's loop thread; its messages land in a queue that the caller's thread
drains.  The first message carries the read lease and the placements (slots
never move while leased, so they come once); each later one says how many
leading pages of each wanted layer are committed.  A layer whose count reaches
the stream's page count is read at once, with the same transport machinery as
``get_prefix`` (one batch per node, generation re-check, checksums), into the
caller's ``out``, then handed out as a :class:`~kvstore.client.types.LayerReady`.
``out`` may be GPU memory (a canonical CUDA array, or one :class:`~kvstore.gpu.PagedKV`
per layer): each read then takes the GPU path of ``get_prefix`` for its layers
(copy engines or one kernel, completed before the generation re-check).

A page found missing or changed during a read ends the hit there for that
layer and every later one: ``num_pages`` only shrinks.  When every wanted layer
has been read the lease is released; :meth:`PrefixStream.close` (or leaving the
``with`` block) cancels the call and releases it early.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.client.types import LayerReady
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error
from kvstore.layout import Layout
from kvstore.transports import CopyPlan

if TYPE_CHECKING:
    import concurrent.futures

    from kvstore.client.client import KVStoreClient
    from kvstore.gpu import CallerSide

log = logging.getLogger("kvstore.client.stream")

DEFAULT_LEASE_BOUND_S = 300.0  # the master's default longest lease: the stream's backstop deadline
_END = object()  # the server closed the stream


def _status_error(update: pb.StreamPrefixUpdate) -> KVStoreError:
    code = ErrorCode.__members__.get(update.code, ErrorCode.INTERNAL)
    message = update.message if update.code in ErrorCode.__members__ else f"{update.code}: {update.message}"
    return KVStoreError(code, message)


class PrefixStream:
    """A prefix read layer by layer as the writer commits it.  Iterate it, or ``wait_layer(layer)``.

    Not to be shared between threads without care: the iterator and ``wait_layer``
    serialise on one lock, and the first to need a message reads whatever it brings.
    """

    def __init__(
        self,
        client: KVStoreClient,
        request: pb.StreamPrefixRequest,
        layout: Layout,
        layers: list[int],
        heads: tuple[int, int],
        buffer: np.ndarray,
        num_full_pages: int,
        side: CallerSide | None = None,
    ) -> None:
        self._client = client
        self._side = side  # GPU memory or paged pools: ``buffer`` is then a placeholder (or their staging)
        self._layout = layout
        self.layers = list(layers)
        self.heads = heads
        self._buffer = buffer  # flat uint8 of [len(layers), num_full_pages, shard]
        self._full_pages = num_full_pages
        self._shard = layout.shard_bytes(heads)
        self.data = buffer.reshape(len(layers), num_full_pages, self._shard)
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self._timeout_s = client._timeout_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.RLock()
        self._pages_ready = np.zeros(len(layers), dtype=np.int64)
        self._delivered: dict[int, LayerReady] = {}
        self._unyielded: collections.deque[LayerReady] = collections.deque()
        self._placements = pb.Placements()
        self._error: KVStoreError | None = None
        self._closed = False
        self._lease_released = False
        self.lease_id = ""
        self.expires_unix_ms = 0
        self.num_pages = 0
        self._call: concurrent.futures.Future[None] | None = None
        if num_full_pages == 0 or not layers:
            self._finish_empty()
            return
        lease_s = request.lease_ms / 1000.0 if request.lease_ms else DEFAULT_LEASE_BOUND_S
        deadline_s = request.wait_ms / 1000.0 + lease_s + self._timeout_s
        self._call = client._loop.submit(self._pump(request, deadline_s))
        try:
            first = self._take()
            assert first is not None  # a blocking take returns a message or raises
            if first.code:
                raise _status_error(first)
            self.lease_id = first.lease_id
            self.expires_unix_ms = int(first.expires_unix_ms)
            self._placements = first.placements
            self.num_pages = min(int(first.num_pages), num_full_pages)
            self._absorb(first)
            self._read_ready()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ the gRPC side (client loop thread)
    async def _pump(self, request: pb.StreamPrefixRequest, deadline_s: float) -> None:
        master = self._client._master
        call = None
        try:
            # The stream goes to the master the unary calls found leading (no failover mid-stream).
            address = await master._leader_address()
            call = master._stub(address).StreamPrefix(request, timeout=deadline_s)
            async for update in call:
                self._queue.put(update)
            self._queue.put(_END)
        except grpc.RpcError as err:
            self._queue.put(from_rpc_error(err))
        except asyncio.CancelledError:
            if call is not None:
                call.cancel()
            self._queue.put(_END)
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
            self._queue.put(KVStoreError(ErrorCode.UNAVAILABLE, f"layer stream failed: {exc}"))

    # ------------------------------------------------------------ the caller's side
    def _take(self, block: bool = True) -> pb.StreamPrefixUpdate | None:
        """The next message (None: none queued, when not blocking); raises the stream's end or failure."""
        try:
            item = self._queue.get(timeout=self._timeout_s) if block else self._queue.get_nowait()
        except queue.Empty:
            if not block:
                return None
            raise KVStoreError(
                ErrorCode.DEADLINE, f"no layer stream update within {self._timeout_s:.1f} s"
            ) from None
        if isinstance(item, KVStoreError):
            raise item
        if item is _END:
            raise KVStoreError(ErrorCode.UNAVAILABLE, "the layer stream ended before every layer was ready")
        assert isinstance(item, pb.StreamPrefixUpdate)
        return item

    def _absorb(self, update: pb.StreamPrefixUpdate) -> None:
        """Take in one message's progress (reads nothing)."""
        if update.code:
            raise _status_error(update)
        self.num_pages = min(self.num_pages, int(update.num_pages))
        moved = np.frombuffer(update.layers_ready, dtype="<u2")
        counts = np.frombuffer(update.pages_ready, dtype="<u4")
        if len(moved) != len(counts):
            raise KVStoreError(ErrorCode.INTERNAL, "stream update with unequal layers and page counts")
        for layer, count in zip(moved.tolist(), counts.tolist(), strict=True):
            position = self._index.get(layer)
            if position is None:
                raise KVStoreError(ErrorCode.INTERNAL, f"stream update names layer {layer}, not asked for")
            self._pages_ready[position] = max(self._pages_ready[position], count)

    def _read_ready(self) -> None:
        """Read every layer that is ready and not read yet."""
        ready = [
            i
            for i in range(len(self.layers))
            if self.layers[i] not in self._delivered and self._pages_ready[i] >= self.num_pages
        ]
        # Consecutive positions are one slice of ``out``: one read (one batch per node) for all of them.
        start = 0
        while start < len(ready):
            end = start + 1
            while end < len(ready) and ready[end] == ready[end - 1] + 1:
                end += 1
            self._read_layers(ready[start], ready[end - 1] + 1)
            start = end
        if len(self._delivered) == len(self.layers):
            self.close()  # everything is in ``out``: the lease and the call have nothing left to do

    def _read_layers(self, first: int, stop: int) -> None:
        count = self.num_pages
        if count > 0:
            per_layer = self._full_pages * self._shard
            plan = CopyPlan(
                self._layout,
                self.layers[first:stop],
                self.heads,
                self._buffer[first * per_layer : stop * per_layer],
                self._full_pages,
                None if self._side is None else self._side.layers(first, stop, per_layer),
            )
            found = self._client._read(self._placements, count, plan)
            if found < count:
                log.info("layer stream: pages from %d on vanished or changed under the read", found)
                self.num_pages = count = found
        for i in range(first, stop):
            data = (
                self.data[i, :count] if self._side is None else self._side.layer_data(i, self.data[i], count)
            )
            ready = LayerReady(self.layers[i], i, count, data)
            self._delivered[ready.layer] = ready
            self._unyielded.append(ready)

    def _advance(self) -> None:
        """Wait for the next message, take in every one queued behind it, read what became ready.

        A backlog (the reader fell behind) becomes one read per run of layers.
        An error ends the stream; it is raised now unless this step delivered
        layers, and by every later step.
        """
        if self._error is not None:
            raise self._error
        if self._closed:
            raise KVStoreError(ErrorCode.UNAVAILABLE, "the layer stream is closed")
        delivered = len(self._delivered)
        update = self._take()
        try:
            while update is not None:
                self._absorb(update)
                update = self._take(block=False)
        except KVStoreError as exc:
            self._error = exc
        try:
            self._read_ready()
        except KVStoreError as exc:
            self._error = self._error or exc
        if self._error is not None:
            self.close()
            if len(self._delivered) == delivered:
                raise self._error

    def _finish_empty(self) -> None:
        for i, layer in enumerate(self.layers):
            data = self.data[i, :0] if self._side is None else self._side.layer_data(i, self.data[i], 0)
            ready = LayerReady(layer, i, 0, data)
            self._delivered[layer] = ready
            self._unyielded.append(ready)

    @property
    def done(self) -> bool:
        """Every wanted layer has been read into ``out``."""
        return len(self._delivered) == len(self.layers)

    @property
    def num_tokens(self) -> int:
        return self.num_pages * self._layout.page_size

    def __iter__(self) -> Iterator[LayerReady]:
        return self

    def __next__(self) -> LayerReady:
        """The next layer read into ``out``, in the order layers became ready."""
        with self._lock:
            while not self._unyielded:
                if self.done:
                    raise StopIteration
                self._advance()
            return self._unyielded.popleft()

    def wait_layer(self, layer: int) -> LayerReady:
        """Block until ``layer`` (namespace numbering) is in ``out``; reads what is needed on the way."""
        if layer not in self._index:
            raise KVStoreError(
                ErrorCode.BAD_RANGE, f"layer {layer} is not streamed (streamed: {self.layers})"
            )
        with self._lock:
            while layer not in self._delivered:
                self._advance()
            return self._delivered[layer]

    # ------------------------------------------------------------ lifetime
    def _release(self) -> None:
        if self._lease_released or not self.lease_id:
            return
        self._lease_released = True
        self._client._release_quietly(self.lease_id)

    def close(self) -> None:
        """Cancel the stream and release its lease (what was read stays in ``out``).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        call = self._call
        if call is not None and not call.done():
            call.cancel()  # cancels the RPC; the master releases the lease too
        self._release()

    def __enter__(self) -> PrefixStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PrefixStream(lease={self.lease_id[:8]}, num_pages={self.num_pages}, "
            f"layers ready {len(self._delivered)}/{len(self.layers)})"
        )


class AsyncPrefixStream:
    """:class:`PrefixStream` for asyncio callers: each blocking step runs in a worker thread."""

    def __init__(self, stream: PrefixStream) -> None:
        self.sync = stream

    @property
    def num_pages(self) -> int:
        return self.sync.num_pages

    @property
    def lease_id(self) -> str:
        return self.sync.lease_id

    def __aiter__(self) -> AsyncPrefixStream:
        return self

    async def __anext__(self) -> LayerReady:
        def step() -> LayerReady | None:
            try:
                return next(self.sync)
            except StopIteration:
                return None

        ready = await asyncio.to_thread(step)
        if ready is None:
            raise StopAsyncIteration
        return ready

    async def wait_layer(self, layer: int) -> LayerReady:
        return await asyncio.to_thread(self.sync.wait_layer, layer)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncPrefixStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
