"""The node registry: who is in the cluster, alive, and how to reach them.

Each node incarnation gets a small registry index (u16, the ``node`` column of
the page index; recycled once the incarnation is gone).  Liveness: a node is
dead when it has not heartbeated for ``node_ttl_s``, or when slot updates to it
have failed for that long.  The master then drops every page it held.  A
known node id registering with a new incarnation replaces the old one (whose
pool file is gone with its process).

Slot updates go to a node over one long-lived ``Node.SlotUpdateStream`` per node
process (a round trip on an open stream costs about half a unary call, and
OpenPut waits for one): batches written in order, answered in order, a rejected
batch answered in band.  Once a stream has answered, a batch is written without
waiting for the answers to those before it (``post_updates``), so a durable
commit's batch costs one round trip, not one more per batch in flight.  A stream that fails or times out is cancelled and the
next batch opens another; a node without the stream (an older one) gets unary
``ApplySlotUpdates`` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error
from kvstore.master.allocator import RegionAllocator
from kvstore.master.notifier import answered

log = logging.getLogger("kvstore.master.nodes")

MAX_NODES = 1 << 16
NO_NODE = 0xFFFF
# tiers: the tier of each registry index, as a small code (NodeRegistry.tier_code)
TIERS = ("dram", "nvme", "vram")
TIER_CODE = {name: code for code, name in enumerate(TIERS)}


@dataclass
class NodeRecord:
    index: int
    node_id: str
    incarnation: bytes
    host_id: str
    control_address: str
    data_address: str
    pool_path: str
    pool_data_offset: int
    pool_bytes: int
    tier: str
    allocator: RegionAllocator
    registered_at: float
    last_heartbeat: float
    alive: bool = True
    ready: bool = True  # False while its registration is being completed: not placed on
    # Until then (clock()), nothing is allocated or evicted here: a previous leader's writers may hold slots.
    warm_until: float = 0.0
    hits: int = 0
    lookups: int = 0
    evictions: int = 0
    # tiers: a node process owns up to three regions, each a record of its own (its own registry
    # index, allocator and page-index column value).  The DRAM record is the node's primary: it
    # heartbeats, holds the channel and lists every region (itself first) in ``regions``.
    primary: NodeRecord | None = field(default=None, repr=False)
    regions: list[NodeRecord] = field(default_factory=list, repr=False)
    draining: bool = False
    demotions: int = 0
    promotions: int = 0
    channel: grpc.aio.Channel | None = field(default=None, repr=False)
    stub: pb_grpc.NodeStub | None = field(default=None, repr=False)
    # vram: the region as the node registered it (IPC handle, device, generation file)
    info: pb.RegionInfo | None = field(default=None, repr=False)
    # Slot updates travel over one Node.SlotUpdateStream per node process (on the primary), opened
    # lazily and replaced after any failure; a batch holds the lock from its write to its answer.
    updates_call: Any = field(default=None, repr=False)  # grpc.aio.StreamStreamCall
    updates_lock: asyncio.Lock | None = field(default=None, repr=False)
    updates_unary: bool = False  # the node has no SlotUpdateStream (an older one): unary calls
    # the stream that has answered a batch (later batches on it are written without waiting for the
    # answers before them), and the answer read last on it (each answer is read after the previous)
    updates_proven: Any = field(default=None, repr=False)
    updates_turn: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def ref(self) -> pb.NodeRef:
        ref = pb.NodeRef(
            node_id=self.node_id,
            incarnation=self.incarnation,
            data_address=self.data_address,
            pool_path=self.pool_path,
            pool_data_offset=self.pool_data_offset,
            pool_bytes=self.pool_bytes,
        )
        if self.tier == "vram" and self.info is not None:
            # slot offsets of this record's placements are into the VRAM region, not the pool file
            ref.tier = "vram"
            ref.ipc_handle = self.info.ipc_handle
            ref.device = self.info.device
            ref.generation_path = self.info.generation_path
            ref.region_bytes = self.info.capacity_bytes
        return ref


class NodeRegistry:
    def __init__(
        self,
        node_ttl_s: float,
        rpc_timeout_s: float,
        max_message_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_ttl_s = node_ttl_s
        self.rpc_timeout_s = rpc_timeout_s
        self._max_message_bytes = max_message_bytes
        self._clock = clock
        self.by_index: dict[int, NodeRecord] = {}
        self.by_id: dict[str, NodeRecord] = {}
        # the last incarnation of nodes that died, for ListNodes and for a comeback
        self.departed: dict[str, NodeRecord] = {}
        self.alive = np.zeros(MAX_NODES, dtype=bool)
        self._free_indices = list(range(MAX_NODES - 2, -1, -1))  # NO_NODE is never an index
        self.tier_code = np.zeros(MAX_NODES, dtype=np.uint8)  # TIER_CODE of each index

    def __len__(self) -> int:
        return len(self.by_index)

    def live(self) -> list[NodeRecord]:
        return [n for n in self.by_index.values() if n.alive]

    def get(self, node_id: str) -> NodeRecord | None:
        return self.by_id.get(node_id)

    def add(
        self,
        request: pb.RegisterNodeRequest,
        allocator: RegionAllocator,
        region: int = 0,
        primary: NodeRecord | None = None,
    ) -> NodeRecord:
        """Register a new incarnation (the caller has removed any previous one of this node id).

        ``region`` > 0: another region of ``primary``'s node (tiers).
        """
        if not self._free_indices:
            raise KVStoreError(
                ErrorCode.TOO_LARGE, f"more than {MAX_NODES - 1} node incarnations are registered"
            )
        now = self._clock()
        tier = request.regions[region].tier if request.regions else "dram"
        record = NodeRecord(
            index=self._free_indices.pop(),
            node_id=request.node_id,
            incarnation=bytes(request.incarnation),
            host_id=request.host_id,
            control_address=request.control_address,
            data_address=request.data_address,
            pool_path=request.pool_path,
            pool_data_offset=request.pool_data_offset,
            pool_bytes=request.pool_bytes,
            tier=tier,
            allocator=allocator,
            registered_at=now,
            last_heartbeat=now,
            info=request.regions[region] if request.regions else None,
        )
        self.by_index[record.index] = record
        self.alive[record.index] = True
        self.tier_code[record.index] = TIER_CODE.get(tier, 0)
        if primary is not None:
            record.primary = primary
            primary.regions.append(record)
            return record
        record.regions = [record]
        self.by_id[record.node_id] = record
        self.departed.pop(record.node_id, None)
        return record

    def remove(self, record: NodeRecord) -> None:
        """Take an incarnation out (dead or replaced); its index is reusable once its pages are dropped."""
        record.alive = False
        self.alive[record.index] = False
        self.by_index.pop(record.index, None)
        if record.primary is not None:  # another region of a node: the primary keeps identity and channel
            self._free_indices.append(record.index)
            return
        if self.by_id.get(record.node_id) is record:
            del self.by_id[record.node_id]
        self.departed[record.node_id] = record
        self._free_indices.append(record.index)
        channel, record.channel, record.stub = record.channel, None, None
        _cancel_stream(record)
        if channel is not None:
            # closing awaits in-flight calls: do it off the caller's path
            # (no running loop: tests driving the master synchronously; the channel is just dropped)
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(channel.close())

    def heartbeat(self, node_id: str, incarnation: bytes) -> bool:
        record = self.by_id.get(node_id)
        if record is None or record.incarnation != incarnation or not record.alive:
            return False
        now = self._clock()
        for region in record.regions or [record]:
            region.last_heartbeat = now
        return True

    def overdue(self, now: float) -> list[NodeRecord]:
        """Live nodes silent for longer than the node TTL."""
        return [
            n
            for n in self.by_index.values()
            if n.alive and n.primary is None and now - n.last_heartbeat > self.node_ttl_s
        ]

    # -- talking to nodes
    def stub(self, record: NodeRecord) -> pb_grpc.NodeStub:
        record = record.primary or record  # one channel per node process, whatever the region
        if record.stub is None:
            options = [
                ("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.max_receive_message_length", self._max_message_bytes),
            ]
            record.channel = grpc.aio.insecure_channel(record.control_address, options=options)
            record.stub = pb_grpc.NodeStub(record.channel)
        return record.stub

    async def send_updates(self, index: int, updates: pb.SlotUpdates) -> None:
        """Have the node apply one batch; raises :class:`KVStoreError` if it was not applied.

        A rejection by the node raises its error (code, message); an unreachable
        node, a broken stream or no answer within the RPC timeout raises
        UNAVAILABLE or DEADLINE (the node may or may not have applied it).
        """
        await (await self.post_updates(index, updates))

    async def post_updates(self, index: int, updates: pb.SlotUpdates) -> Awaitable[None]:
        """Write one batch to the node and return its answer to await (raising as :meth:`send_updates`).

        Batches are written in call order and answered in that order.  On a stream
        that has answered before, a batch is written at once, behind those in
        flight, without waiting for their answers (a durable commit's batch then
        costs one node round trip, not one more per batch ahead of it); the first
        batch of a stream, and unary calls, complete before this returns.
        """
        record = self.by_index.get(index)
        if record is None:
            return answered()  # gone: its slots went with it
        if record.primary is not None:
            updates.tier = record.tier
        node = record.primary or record  # one stream per node process, whatever the region
        if not node.updates_unary:
            if node.updates_lock is None:
                node.updates_lock = asyncio.Lock()
            # Regions of one node have queues of their own in the notifier, so two batches may be
            # sent at once here: the lock orders the writes, and answers come in the same order.
            async with node.updates_lock:
                if not node.updates_unary:
                    call = node.updates_call
                    if call is not None and not call.done() and call is node.updates_proven:
                        return await self._post_streamed(node, call, updates)
                    if await self._send_streamed(node, updates):
                        node.updates_proven, node.updates_turn = node.updates_call, None
                        return answered()
        try:
            await self.stub(record).ApplySlotUpdates(updates, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
        return answered()

    async def _post_streamed(
        self, node: NodeRecord, call: Any, updates: pb.SlotUpdates
    ) -> asyncio.Task[None]:
        """Write one batch on a stream that answers; a task reads its answer after the previous one's."""
        try:
            async with asyncio.timeout(self.rpc_timeout_s):
                await call.write(updates)
        except BaseException as exc:
            self._stream_failed(node, call, exc)
        loop = asyncio.get_running_loop()
        turn, mine = node.updates_turn, loop.create_future()
        node.updates_turn = mine
        task = loop.create_task(self._read_answer(node, call, turn))
        # the next answer is read once this one is, however this task ends (even cancelled unstarted)
        task.add_done_callback(functools.partial(_pass_turn, mine))
        task.add_done_callback(_retrieve)
        return task

    async def _read_answer(self, node: NodeRecord, call: Any, turn: asyncio.Future[None] | None) -> None:
        try:
            async with asyncio.timeout(self.rpc_timeout_s):
                if turn is not None:
                    await turn  # never raises: set once the previous answer was read
                response = await call.read()
        except BaseException as exc:
            self._stream_failed(node, call, exc)
        _check_answer(node, call, response)

    def _stream_failed(self, node: NodeRecord, call: Any, exc: BaseException) -> NoReturn:
        """Cancel the stream (its order is lost) and raise what ``exc`` means for the batch."""
        _cancel_stream(node, call)
        failure = self._stream_failure(node, exc)
        if failure is exc:
            raise exc
        raise failure from exc

    def _stream_failure(self, node: NodeRecord, exc: BaseException) -> BaseException:
        """What a failed write or read on a slot update stream raises (the stream is cancelled already).

        The node answers its own errors in band: a failed stream is the transport's failure (a dead
        peer shows as INTERNAL "from Core" on write, CANCELLED if the node stopped).
        """
        if isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is None or task.cancelling():
                return exc  # this sender is being cancelled
            return KVStoreError(
                ErrorCode.UNAVAILABLE, f"slot update stream to node {node.node_id} was closed"
            )
        if isinstance(exc, grpc.aio.AioRpcError):
            return KVStoreError(
                ErrorCode.DEADLINE
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                else ErrorCode.UNAVAILABLE,
                f"slot update stream to node {node.node_id} failed: {exc.code().name} {exc.details()}",
            )
        if isinstance(exc, TimeoutError):
            return KVStoreError(
                ErrorCode.DEADLINE,
                f"node {node.node_id} did not answer slot updates within {self.rpc_timeout_s:g} s",
            )
        if isinstance(exc, asyncio.InvalidStateError):
            return KVStoreError(
                ErrorCode.UNAVAILABLE, f"slot update stream to node {node.node_id} ended: {exc}"
            )
        return exc

    async def _send_streamed(self, node: NodeRecord, updates: pb.SlotUpdates) -> bool:
        """One batch over the node's stream; False if the node does not serve the stream."""
        call = node.updates_call
        if call is None or call.done():
            call = node.updates_call = self.stub(node).SlotUpdateStream()
        try:
            # asyncio.timeout, not wait_for: no task per batch on the put's critical path
            async with asyncio.timeout(self.rpc_timeout_s):
                await call.write(updates)
                response = await call.read()
        except BaseException as exc:
            # Whatever happened (timeout, cancellation, transport), this batch's answer may still be
            # on its way: the stream's order is lost.  The next batch opens a new stream.
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # nothing was applied: an older node; it gets unary calls from now on
                _cancel_stream(node, call)
                log.info("node %s has no SlotUpdateStream: unary slot updates", node.node_id)
                node.updates_unary = True
                return False
            self._stream_failed(node, call, exc)
        _check_answer(node, call, response)
        return True

    async def inventory(self, record: NodeRecord) -> pb.InventoryResponse:
        request = pb.InventoryRequest(tier=record.tier if record.primary is not None else "")
        return await self.stub(record).GetInventory(request, timeout=self.rpc_timeout_s)

    async def close(self) -> None:
        for record in list(self.by_index.values()):
            _cancel_stream(record)
            if record.channel is not None:
                await record.channel.close()
                record.channel, record.stub = None, None


def _pass_turn(turn: asyncio.Future[None], _: asyncio.Task[None]) -> None:
    if not turn.done():
        turn.set_result(None)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a read task's failure as seen (its batch's flush reports it, if anyone still waits)."""
    if not task.cancelled():
        task.exception()


def _check_answer(node: NodeRecord, call: Any, response: Any) -> None:
    """Raise unless ``response`` (read from the node's slot update stream) says the batch was applied."""
    if response is grpc.aio.EOF:
        _cancel_stream(node, call)
        raise KVStoreError(ErrorCode.UNAVAILABLE, f"node {node.node_id} ended the slot update stream")
    if response.error_code:
        # the node rejected the batch (and applied nothing of it); the stream stays open
        code = ErrorCode.__members__.get(response.error_code, ErrorCode.INTERNAL)
        raise KVStoreError(code, response.error_message)


def _cancel_stream(record: NodeRecord, call: Any = None) -> None:
    """Cancel and forget ``record``'s slot update stream (only if it is still ``call``, when given)."""
    if record.updates_call is None or (call is not None and record.updates_call is not call):
        return
    record.updates_call.cancel()
    record.updates_call = None
