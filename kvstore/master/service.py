"""gRPC servicers of the master: request decoding and validation, then :mod:`kvstore.master.core`.

Every method is wrapped by :func:`kvstore.errors.grpc_errors`, so a bad request
gets its documented status and the service keeps serving everyone else.
"""

from __future__ import annotations

import grpc
import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, grpc_errors
from kvstore.keys import KEY_BYTES
from kvstore.master.core import Master

MAX_NAME_BYTES = 256
MAX_EXTRA_NAME = 256
MAX_LEASE_ID = 64


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


def _packed(data: bytes, dtype: str, what: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if len(data) % size:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT, f"{what}: {len(data)} bytes is not a multiple of {size}"
        )
    return np.frombuffer(data, dtype=dtype)


def _tp(rank: int, size: int) -> tuple[int, int]:
    if size == 0:  # unset: a writer without tensor parallelism
        if rank != 0:
            raise KVStoreError(ErrorCode.BAD_RANGE, f"tp_rank {rank} given without tp_size")
        return 0, 1
    if not 0 <= rank < size:
        raise KVStoreError(ErrorCode.BAD_RANGE, f"tp_rank {rank} not in [0, tp_size={size})")
    return rank, size


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, master: Master) -> None:
        self.master = master
        self.max_pages = master.cfg.max_request_pages

    @grpc_errors
    async def CreateNamespace(
        self, request: pb.CreateNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateNamespaceResponse:
        if not request.HasField("spec"):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "spec is required")
        _name(request.spec.name)
        spec, created = await self.master.create_namespace(request.spec)
        return pb.CreateNamespaceResponse(spec=spec, created=created)

    @grpc_errors
    async def GetNamespace(
        self, request: pb.GetNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetNamespaceResponse:
        ns = await self.master.namespace(_name(request.name))
        return pb.GetNamespaceResponse(spec=ns.spec)

    @grpc_errors
    async def ListNamespaces(
        self, request: pb.ListNamespacesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNamespacesResponse:
        return pb.ListNamespacesResponse(specs=await self.master.list_namespaces())

    @grpc_errors
    async def DeleteNamespace(
        self, request: pb.DeleteNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteNamespaceResponse:
        freed = await self.master.delete_namespace(_name(request.name))
        return pb.DeleteNamespaceResponse(pages_freed=freed)

    @grpc_errors
    async def OpenPut(
        self, request: pb.OpenPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenPutResponse:
        packed = _keys(request.keys, self.max_pages, allow_empty=False)
        if len(request.parent_key) not in (0, KEY_BYTES):
            raise KVStoreError(ErrorCode.BAD_KEYS, f"parent_key must be empty or {KEY_BYTES} bytes")
        rank, size = _tp(request.tp_rank, request.tp_size)
        return await self.master.open_put(
            _name(request.namespace),
            packed,
            parent_key=bytes(request.parent_key),
            tp_rank=rank,
            tp_size=size,
            client_host=request.client_host,
            reader_host=request.reader_host,
            lease_ms=request.lease_ms,
        )

    @grpc_errors
    async def CommitLayer(
        self, request: pb.CommitLayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitLayerResponse:
        layers = _packed(request.layers, "<u2", "layers")
        checksums = _packed(request.checksums, "<u8", "checksums")
        completed, done = self.master.commit_layer(request.session_id, layers, checksums)
        return pb.CommitLayerResponse(pages_completed=completed, session_done=done)

    @grpc_errors
    async def AbortPut(
        self, request: pb.AbortPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortPutResponse:
        return pb.AbortPutResponse(pages_freed=self.master.abort_put(request.session_id))

    @grpc_errors
    async def MatchPrefix(
        self, request: pb.MatchPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.MatchPrefixResponse:
        packed = _keys(request.keys, self.max_pages)
        return pb.MatchPrefixResponse(
            num_pages=await self.master.match_prefix(_name(request.namespace), packed)
        )

    @grpc_errors
    async def AcquirePrefix(
        self, request: pb.AcquirePrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcquirePrefixResponse:
        packed = _keys(request.keys, self.max_pages)
        return await self.master.acquire_prefix(
            _name(request.namespace), packed, lease_ms=request.lease_ms, client_host=request.client_host
        )

    @grpc_errors
    async def DescribeLease(
        self, request: pb.DescribeLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcquirePrefixResponse:
        if not request.lease_id or len(request.lease_id) > MAX_LEASE_ID:
            raise KVStoreError(ErrorCode.LEASE_NOT_FOUND, "read lease unknown, released or expired")
        return self.master.describe_lease(request.lease_id)

    @grpc_errors
    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseLeaseResponse:
        return pb.ReleaseLeaseResponse(released=self.master.release_lease(request.lease_id))

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
        namespace, digest, name = self._extra_key(request.namespace, request.sequence_digest, request.name)
        limit = self.master.cfg.max_extra_bytes
        if len(request.data) > limit:
            raise KVStoreError(
                ErrorCode.TOO_LARGE, f"extra of {len(request.data)} bytes; the limit is {limit}"
            )
        await self.master.put_extra(namespace, digest, name, bytes(request.data))
        return pb.PutExtraResponse()

    @grpc_errors
    async def GetExtra(
        self, request: pb.GetExtraRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetExtraResponse:
        namespace, digest, name = self._extra_key(request.namespace, request.sequence_digest, request.name)
        return pb.GetExtraResponse(data=await self.master.get_extra(namespace, digest, name))


class NodeRegistryServicer(pb_grpc.NodeRegistryServicer):
    def __init__(self, master: Master) -> None:
        self.master = master

    @grpc_errors
    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterNodeResponse:
        return await self.master.register_node(request)

    @grpc_errors
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        known = self.master.heartbeat(request.node_id, bytes(request.incarnation))
        return pb.HeartbeatResponse(known=known, term=self.master.term)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, master: Master) -> None:
        self.master = master

    @grpc_errors
    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(
            nodes=self.master.node_statuses(),
            term=self.master.term,
            leader_address=self.master.leadership.leader_address,
        )

    @grpc_errors
    async def ClusterStats(
        self, request: pb.ClusterStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatsResponse:
        return self.master.cluster_stats()

    @grpc_errors
    async def Evict(self, request: pb.EvictRequest, context: grpc.aio.ServicerContext) -> pb.EvictResponse:
        evicted, skipped = await self.master.admin_evict(request.namespace, request.all)
        return pb.EvictResponse(pages_evicted=evicted, pages_skipped_leased=skipped)

    @grpc_errors
    async def GetConfig(
        self, request: pb.GetConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConfigResponse:
        return pb.GetConfigResponse(toml=self.master.cfg.to_toml())


def add_servicers(server: grpc.aio.Server, master: Master) -> None:
    pb_grpc.add_KVStoreServicer_to_server(KVStoreServicer(master), server)
    pb_grpc.add_NodeRegistryServicer_to_server(NodeRegistryServicer(master), server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(master), server)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # a second master on a taken port must fail, not share it
        ("grpc.so_reuseport", 0),
    ]
