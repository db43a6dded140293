"""gRPC servicers of the master: request decoding and validation, then :mod:`kvstore.master.core`.

Every method is wrapped by :func:`kvstore.errors.grpc_errors`, so a bad request
gets its documented status and the service keeps serving everyone else.  The
servicers ask the :class:`kvstore.master.role.MasterRole` for the leading Master
on every call: a standby answers KVStore and NodeRegistry calls with NOT_LEADER
naming the leader, and Admin ListNodes / GetConfig on any master.

``KVStore.Call`` carries the hot unary calls of a client (:data:`STREAMED`)
over one bidirectional stream: each request runs as a task of its own through
the unary handler's own body, and is answered once under its id, with the
error fields a unary call would carry in its status and trailing metadata.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, from_status, grpc_errors, unexpected_error
from kvstore.keys import KEY_BYTES
from kvstore.master.core import Master
from kvstore.master.role import MasterRole
from kvstore.packed import unpack

log = logging.getLogger("kvstore.master")

MAX_NAME_BYTES = 256
MAX_EXTRA_NAME = 256
MAX_LEASE_ID = 64
# Requests of one Call stream running at once; past it the stream is read no further (gRPC flow
# control holds the client back), so one client cannot pile up unbounded work on the master.
MAX_STREAM_IN_FLIGHT = 256
# The unary KVStore calls a client may send over the Call stream.  Their handlers use nothing of
# their context but what _CallContext gives (none uses it today); the client routes the same set.
STREAMED = (
    "OpenPut",
    "CommitLayer",
    "AbortPut",
    "MatchPrefix",
    "AcquirePrefix",
    "DescribeLease",
    "ReleaseLease",
)


def _keys(packed: bytes, limit: int, allow_empty: bool = True) -> bytes:
    if len(packed) % KEY_BYTES:
        raise KVStoreError(
            ErrorCode.BAD_KEYS, f"{len(packed)} bytes of keys is not a multiple of {KEY_BYTES}"
        )
    if not packed and not allow_empty:
        raise KVStoreError(ErrorCode.BAD_KEYS, "no page keys")
    pages = len(packed) // KEY_BYTES
    if pages > limit:
        raise KVStoreError(ErrorCode.TOO_LARGE, f"{pages} pages in one request; the limit is {limit}")
    return bytes(packed)


def _name(name: str) -> str:
    if not name:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "namespace name is empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"namespace name longer than {MAX_NAME_BYTES} bytes")
    return name


def _tp(rank: int, size: int) -> tuple[int, int]:
    if size == 0:  # unset: a writer without tensor parallelism
        if rank != 0:
            raise KVStoreError(ErrorCode.BAD_RANGE, f"tp_rank {rank} given without tp_size")
        return 0, 1
    if not 0 <= rank < size:
        raise KVStoreError(ErrorCode.BAD_RANGE, f"tp_rank {rank} not in [0, tp_size={size})")
    return rank, size


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, role: MasterRole) -> None:
        self.role = role
        self.max_pages = role.cfg.max_request_pages
        self.max_message_bytes = role.cfg.max_message_bytes - 64  # room for CallResponse's own fields
        self._receiving: set[asyncio.Task[None]] = set()  # each open Call stream's request reader
        self._ending = False

    def end_streams(self) -> None:
        """The server stops: every Call stream reads no more requests, answers those in flight and ends.

        A stream lasts as long as its client, so without this ``server.stop(grace)``
        would wait out the whole grace for them before the master resigns.  Their
        clients see the stream end and retry the requests it did not read elsewhere.
        """
        self._ending = True
        for receiving in list(self._receiving):
            receiving.cancel()

    @grpc_errors
    async def CreateNamespace(
        self, request: pb.CreateNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateNamespaceResponse:
        master = await self.role.master()
        if not request.HasField("spec"):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "spec is required")
        _name(request.spec.name)
        spec, created = await master.create_namespace(request.spec)
        return pb.CreateNamespaceResponse(spec=spec, created=created)

    @grpc_errors
    async def GetNamespace(
        self, request: pb.GetNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetNamespaceResponse:
        master = await self.role.master()
        ns = await master.namespace(_name(request.name))
        return pb.GetNamespaceResponse(spec=ns.spec)

    @grpc_errors
    async def ListNamespaces(
        self, request: pb.ListNamespacesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNamespacesResponse:
        master = await self.role.master()
        return pb.ListNamespacesResponse(specs=await master.list_namespaces())

    @grpc_errors
    async def DeleteNamespace(
        self, request: pb.DeleteNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteNamespaceResponse:
        master = await self.role.master()
        freed = await master.delete_namespace(_name(request.name))
        return pb.DeleteNamespaceResponse(pages_freed=freed)

    @grpc_errors
    async def OpenPut(
        self, request: pb.OpenPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenPutResponse:
        master = await self.role.master()
        packed = _keys(request.keys, self.max_pages, allow_empty=False)
        if len(request.parent_key) not in (0, KEY_BYTES):
            raise KVStoreError(ErrorCode.BAD_KEYS, f"parent_key must be empty or {KEY_BYTES} bytes")
        rank, size = _tp(request.tp_rank, request.tp_size)
        return await master.open_put(
            _name(request.namespace),
            packed,
            parent_key=bytes(request.parent_key),
            tp_rank=rank,
            tp_size=size,
            client_host=request.client_host,
            reader_host=request.reader_host,
            lease_ms=request.lease_ms,
            prefer_tier=request.prefer_tier,
        )

    @grpc_errors
    async def CommitLayer(
        self, request: pb.CommitLayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitLayerResponse:
        master = await self.role.master()
        layers = unpack(request.layers, "<u2", "layers")
        checksums = unpack(request.checksums, "<u8", "checksums")
        completed, done = await master.commit_layer_durably(
            request.session_id, layers, checksums, deferred=request.deferred
        )
        return pb.CommitLayerResponse(pages_completed=completed, session_done=done)

    @grpc_errors
    async def AbortPut(
        self, request: pb.AbortPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortPutResponse:
        master = await self.role.master()
        return pb.AbortPutResponse(pages_freed=master.abort_put(request.session_id))

    @grpc_errors
    async def MatchPrefix(
        self, request: pb.MatchPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.MatchPrefixResponse:
        master = await self.role.master()
        packed = _keys(request.keys, self.max_pages)
        return pb.MatchPrefixResponse(num_pages=await master.match_prefix(_name(request.namespace), packed))

    @grpc_errors
    async def AcquirePrefix(
        self, request: pb.AcquirePrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcquirePrefixResponse:
        master = await self.role.master()
        packed = _keys(request.keys, self.max_pages)
        return await master.acquire_prefix(
            _name(request.namespace), packed, lease_ms=request.lease_ms, client_host=request.client_host
        )

    @grpc_errors
    async def DescribeLease(
        self, request: pb.DescribeLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcquirePrefixResponse:
        master = await self.role.master()
        if not request.lease_id or len(request.lease_id) > MAX_LEASE_ID:
            raise KVStoreError(ErrorCode.LEASE_NOT_FOUND, "read lease unknown, released or expired")
        return master.describe_lease(request.lease_id)

    @grpc_errors
    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseLeaseResponse:
        master = await self.role.master()
        return pb.ReleaseLeaseResponse(released=master.release_lease(request.lease_id))

    async def StreamPrefix(
        self, request: pb.StreamPrefixRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamPrefixUpdate]:
        """Layer streaming (kvstore.master.streams).  Every problem is a status in the last message."""
        try:
            master = await self.role.master()
            packed = _keys(request.keys, self.max_pages, allow_empty=False)
            layers = unpack(request.layers, "<u2", "layers")
            async for update in master.streams.stream(
                _name(request.namespace),
                packed,
                layers,
                lease_ms=request.lease_ms,
                client_host=request.client_host,
                wait_ms=request.wait_ms,
            ):
                yield update
        except KVStoreError as exc:
            message = f"{exc.message} (leader: {exc.leader})" if exc.leader else exc.message
            yield pb.StreamPrefixUpdate(code=exc.code.name, message=message)
        except Exception as exc:  # noqa: BLE001 - the boundary of a request: only this stream ends
            log.exception("unhandled error in StreamPrefix")
            yield pb.StreamPrefixUpdate(code=ErrorCode.INTERNAL.name, message=f"{type(exc).__name__}: {exc}")

    # -- tiers
    @grpc_errors
    async def PinPrefix(
        self, request: pb.PinPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.PinPrefixResponse:
        master = await self.role.master()
        packed = _keys(request.keys, self.max_pages, allow_empty=False)
        pages, until = await master.pin_prefix(_name(request.namespace), packed, request.ttl_ms)
        return pb.PinPrefixResponse(num_pages=pages, pinned_until_unix_ms=int(until * 1000) if pages else 0)

    @grpc_errors
    async def UnpinPrefix(
        self, request: pb.UnpinPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.PinPrefixResponse:
        master = await self.role.master()
        packed = _keys(request.keys, self.max_pages, allow_empty=False)
        return pb.PinPrefixResponse(num_pages=await master.unpin_prefix(_name(request.namespace), packed))

    def _extra_key(self, namespace: str, digest: bytes, name: str) -> tuple[str, bytes, str]:
        if len(digest) != 16:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "sequence_digest must be 16 bytes")
        if not name or len(name.encode()) > MAX_EXTRA_NAME:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"extra name must be 1-{MAX_EXTRA_NAME} bytes")
        return _name(namespace), bytes(digest), name

    @grpc_errors
    async def PutExtra(
        self, request: pb.PutExtraRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutExtraResponse:
        master = await self.role.master()
        namespace, digest, name = self._extra_key(request.namespace, request.sequence_digest, request.name)
        limit = master.cfg.max_extra_bytes
        if len(request.data) > limit:
            raise KVStoreError(
                ErrorCode.TOO_LARGE, f"extra of {len(request.data)} bytes; the limit is {limit}"
            )
        await master.put_extra(namespace, digest, name, bytes(request.data))
        return pb.PutExtraResponse()

    @grpc_errors
    async def GetExtra(
        self, request: pb.GetExtraRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetExtraResponse:
        master = await self.role.master()
        namespace, digest, name = self._extra_key(request.namespace, request.sequence_digest, request.name)
        return pb.GetExtraResponse(data=await master.get_extra(namespace, digest, name))

    # -- the Call stream
    async def Call(
        self, request_iterator: AsyncIterator[pb.CallRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CallResponse]:
        """Run each request of the stream as a task of its own; answer each once, in completion order."""
        answers: asyncio.Queue[pb.CallResponse | None] = asyncio.Queue()
        room = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()

        async def run(call: pb.CallRequest) -> None:
            try:
                answers.put_nowait(await self._answer(call, context))
            finally:
                room.release()

        async def receive() -> None:
            async for call in request_iterator:
                await room.acquire()
                task = asyncio.create_task(run(call))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def read() -> None:
            receiving = asyncio.create_task(receive())
            self._receiving.add(receiving)
            try:
                try:
                    await receiving
                except asyncio.CancelledError:
                    if not self._ending:
                        raise
                # the client is done sending, or the server stops: answer what is in flight, then end
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                self._receiving.discard(receiving)
                receiving.cancel()
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # a broken request stream ends this one with its error
        finally:
            # the client went away (or cancelled): nobody waits for these answers any more
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _answer(self, call: pb.CallRequest, context: grpc.aio.ServicerContext) -> pb.CallResponse:
        """One request of a Call stream, answered as its unary RPC would be (status -> error fields)."""
        try:
            entry = _DISPATCH.get(call.method)
            if entry is None:
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{call.method!r} cannot be called over Call")
            request_type, handler = entry
            try:
                request = request_type.FromString(call.request)
            except Exception as exc:  # noqa: BLE001 - a malformed message is the caller's error
                raise KVStoreError(
                    ErrorCode.INVALID_ARGUMENT, f"{call.method} request does not parse: {exc}"
                ) from None
            if not call.timeout_ms:
                response = await handler(self, request, _CallContext(context))
            else:
                # as a unary deadline would: the handler is cancelled and the call fails with DEADLINE
                try:
                    async with asyncio.timeout(call.timeout_ms / 1000.0):
                        response = await handler(self, request, _CallContext(context))
                except TimeoutError:
                    raise KVStoreError(ErrorCode.DEADLINE, "Deadline Exceeded") from None
            data = response.SerializeToString()
            if len(data) > self.max_message_bytes:  # would break the whole stream: fail this call only
                raise KVStoreError(
                    ErrorCode.TOO_LARGE,
                    f"{call.method} answer of {len(data)} bytes exceeds max_message_bytes",
                )
            return pb.CallResponse(id=call.id, response=data)
        except KVStoreError as exc:
            return _error_answer(call.id, exc)
        except Exception as exc:  # noqa: BLE001 - the boundary of a request: only this call fails
            return _error_answer(call.id, unexpected_error(exc, f"{call.method} (Call stream)"))


def _error_answer(call_id: int, exc: KVStoreError) -> pb.CallResponse:
    """What grpc_errors puts in a unary call's status and trailing metadata, as CallResponse fields."""
    return pb.CallResponse(
        id=call_id,
        error_code=exc.code.name,
        error_message=exc.message,
        leader=exc.leader,
        retry_after_ms=max(0, int(exc.retry_after_ms)),
    )


class _CallContext:
    """The servicer context a handler gets for one request of a Call stream.

    Peer and metadata are the stream's; ``abort`` fails this request only (a
    KVStoreError carrying what the unary call's status would have said), never
    the stream.
    """

    __slots__ = ("_stream", "_trailing")

    def __init__(self, stream: grpc.aio.ServicerContext) -> None:
        self._stream = stream
        self._trailing: Sequence[tuple[str, Any]] = ()

    def peer(self) -> str:
        return str(self._stream.peer())

    def invocation_metadata(self) -> Any:
        return self._stream.invocation_metadata()

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self._trailing = tuple(trailing_metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, Any]] = ()
    ) -> NoReturn:
        raise from_status(code, details, tuple(trailing_metadata) or self._trailing)


_Body = Callable[[KVStoreServicer, Any, Any], Awaitable[Any]]


def _dispatch() -> dict[str, tuple[Any, _Body]]:
    """name -> (request type, the unary handler's body without its grpc_errors wrapper)."""
    methods = pb.DESCRIPTOR.services_by_name["KVStore"].methods_by_name
    table: dict[str, tuple[Any, _Body]] = {}
    for name in STREAMED:
        body = inspect.unwrap(getattr(KVStoreServicer, name))
        table[name] = (getattr(pb, methods[name].input_type.name), body)
    return table


_DISPATCH = _dispatch()


class NodeRegistryServicer(pb_grpc.NodeRegistryServicer):
    def __init__(self, role: MasterRole) -> None:
        self.role = role

    @grpc_errors
    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterNodeResponse:
        master = await self.role.master()
        return await master.register_node(request)

    @grpc_errors
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        master = await self.role.master()
        known = master.heartbeat(request.node_id, bytes(request.incarnation))
        return pb.HeartbeatResponse(known=known, term=master.term)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, role: MasterRole) -> None:
        self.role = role

    @grpc_errors
    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodesResponse:
        return await self.role.list_nodes()

    @grpc_errors
    async def ClusterStats(
        self, request: pb.ClusterStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatsResponse:
        master = await self.role.master()
        return master.cluster_stats()

    @grpc_errors
    async def Evict(self, request: pb.EvictRequest, context: grpc.aio.ServicerContext) -> pb.EvictResponse:
        master = await self.role.master()
        packed = _keys(request.keys, master.cfg.max_request_pages)
        evicted, skipped = await master.admin_evict(
            request.namespace, request.all, packed, request.node_id, request.tier
        )
        return pb.EvictResponse(pages_evicted=evicted, pages_skipped_leased=skipped)

    @grpc_errors
    async def DrainNode(
        self, request: pb.DrainNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainNodeResponse:
        master = await self.role.master()
        if not request.node_id or len(request.node_id) > 256:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "node_id must be 1-256 characters")
        return await master.tiering.drain(
            request.node_id, force=request.force, cancel=request.cancel, status_only=request.status_only
        )

    @grpc_errors
    async def GetConfig(
        self, request: pb.GetConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConfigResponse:
        return pb.GetConfigResponse(toml=self.role.cfg.to_toml())


def add_servicers(server: grpc.aio.Server, role: MasterRole | Master) -> KVStoreServicer:
    """Serve ``role`` (or always one already started Master) on ``server``.

    Returns the KVStore servicer: call its :meth:`~KVStoreServicer.end_streams` before
    ``server.stop(grace)``, or the grace period is spent waiting for clients' Call streams,
    which last as long as the clients.
    """
    if isinstance(role, Master):
        role = MasterRole.fixed(role)
    kvstore = KVStoreServicer(role)
    pb_grpc.add_KVStoreServicer_to_server(kvstore, server)
    pb_grpc.add_NodeRegistryServicer_to_server(NodeRegistryServicer(role), server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(role), server)
    return kvstore


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # a second master on a taken port must fail, not share it
        ("grpc.so_reuseport", 0),
    ]
