"""The master's gRPC surface, in-process: real grpc.aio servers on loopback, a fake node servicer."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from kvstore import config, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error
from kvstore.master.core import Master
from kvstore.master.service import add_servicers, server_options
from kvstore.metadata.embedded import EmbeddedBackend


class FakeNode(pb_grpc.NodeServicer):
    def __init__(self) -> None:
        self.updates: list[pb.SlotUpdates] = []

    async def ApplySlotUpdates(self, request: pb.SlotUpdates, context: Any) -> pb.SlotUpdatesResponse:
        self.updates.append(request)
        return pb.SlotUpdatesResponse(applied=1)

    async def GetInventory(self, request: pb.InventoryRequest, context: Any) -> pb.InventoryResponse:
        return pb.InventoryResponse()


async def expect(code: ErrorCode, call: Any) -> KVStoreError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = from_rpc_error(info.value)
    assert err.code == code, err
    assert info.value.code() == code.status
    return err


async def scenario() -> None:
    cfg = config.load({"max_request_pages": 64, "max_extra_bytes": 1024}, environ={})
    master = Master(cfg, EmbeddedBackend())
    server = grpc.aio.server(options=server_options(cfg.max_message_bytes))
    add_servicers(server, master)
    port = server.add_insecure_port("127.0.0.1:0")
    node_server = grpc.aio.server()
    fake = FakeNode()
    pb_grpc.add_NodeServicer_to_server(fake, node_server)
    node_port = node_server.add_insecure_port("127.0.0.1:0")
    await master.start(f"127.0.0.1:{port}")
    await server.start()
    await node_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        kv = pb_grpc.KVStoreStub(channel)
        reg = pb_grpc.NodeRegistryStub(channel)
        admin = pb_grpc.AdminStub(channel)
        t = 5.0

        created = await kv.CreateNamespace(
            pb.CreateNamespaceRequest(
                spec=pb.NamespaceSpec(name="m", page_size=4, num_layers=2, segment_bytes=4096)
            ),
            timeout=t,
        )
        assert created.created and created.spec.segment_bytes == 4096
        incarnation = b"\x01" * 16
        answer = await reg.RegisterNode(
            pb.RegisterNodeRequest(
                node_id="n1",
                incarnation=incarnation,
                host_id="h",
                control_address=f"127.0.0.1:{node_port}",
                data_address="127.0.0.1:9",
                pool_path="/nonexistent",
                regions=[pb.RegionInfo(tier="dram", capacity_bytes=1 << 24)],
            ),
            timeout=t,
        )
        assert answer.term == 1 and len(answer.grant_secret) == 32
        assert (
            await reg.Heartbeat(pb.HeartbeatRequest(node_id="n1", incarnation=incarnation), timeout=t)
        ).known
        assert not (
            await reg.Heartbeat(pb.HeartbeatRequest(node_id="zz", incarnation=incarnation), timeout=t)
        ).known

        root = keys.namespace_root("m")
        packed = keys.pack_keys(keys.page_keys(root, np.arange(12), 4))
        put = await kv.OpenPut(pb.OpenPutRequest(namespace="m", keys=packed, client_host="h"), timeout=t)
        assert list(put.status) == [pb.PAGE_NEW] * 3
        assert fake.updates and fake.updates[0].assign_keys == packed  # before OpenPut answered
        for layer in range(2):
            done = await kv.CommitLayer(
                pb.CommitLayerRequest(
                    session_id=put.session_id,
                    layers=np.array([layer], "<u2").tobytes(),
                    checksums=np.zeros(3, "<u8").tobytes(),
                ),
                timeout=t,
            )
        assert done.pages_completed == 3 and done.session_done
        match = await kv.MatchPrefix(pb.MatchPrefixRequest(namespace="m", keys=packed), timeout=t)
        assert match.num_pages == 3
        lease = await kv.AcquirePrefix(pb.AcquirePrefixRequest(namespace="m", keys=packed), timeout=t)
        assert lease.num_pages == 3 and lease.placements.nodes[0].node_id == "n1"
        described = await kv.DescribeLease(pb.DescribeLeaseRequest(lease_id=lease.lease_id), timeout=t)
        assert described.keys == packed
        stats = await admin.ClusterStats(pb.ClusterStatsRequest(), timeout=t)
        assert stats.pages == 3 and stats.active_read_leases == 1
        evicted = await admin.Evict(pb.EvictRequest(all=True), timeout=t)
        assert (evicted.pages_evicted, evicted.pages_skipped_leased) == (0, 3)
        assert (await kv.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease.lease_id), timeout=t)).released
        evicted = await admin.Evict(pb.EvictRequest(namespace="m"), timeout=t)
        assert evicted.pages_evicted == 3
        nodes = await admin.ListNodes(pb.ListNodesRequest(), timeout=t)
        assert nodes.nodes[0].alive and nodes.nodes[0].tiers[0].capacity_bytes == 1 << 24
        assert "read_lease_ms" in (await admin.GetConfig(pb.GetConfigRequest(), timeout=t)).toml

        digest = keys.sequence_digest(root, np.arange(13))
        await kv.PutExtra(
            pb.PutExtraRequest(namespace="m", sequence_digest=digest, name="tok", data=b"7"), timeout=t
        )
        got = await kv.GetExtra(
            pb.GetExtraRequest(namespace="m", sequence_digest=digest, name="tok"), timeout=t
        )
        assert got.data == b"7"

        # every bad input gets its status, and the service keeps serving
        await expect(
            ErrorCode.BAD_KEYS, kv.OpenPut(pb.OpenPutRequest(namespace="m", keys=b"x" * 17), timeout=t)
        )
        await expect(ErrorCode.BAD_KEYS, kv.OpenPut(pb.OpenPutRequest(namespace="m", keys=b""), timeout=t))
        await expect(
            ErrorCode.TOO_LARGE,
            kv.MatchPrefix(pb.MatchPrefixRequest(namespace="m", keys=bytes(16 * 65)), timeout=t),
        )
        await expect(
            ErrorCode.NAMESPACE_NOT_FOUND,
            kv.MatchPrefix(pb.MatchPrefixRequest(namespace="q", keys=packed), timeout=t),
        )
        await expect(
            ErrorCode.BAD_RANGE,
            kv.OpenPut(pb.OpenPutRequest(namespace="m", keys=packed, tp_rank=3, tp_size=2), timeout=t),
        )
        await expect(
            ErrorCode.INVALID_ARGUMENT,
            kv.CommitLayer(pb.CommitLayerRequest(session_id=put.session_id, layers=b"\x00"), timeout=t),
        )
        await expect(
            ErrorCode.SESSION_NOT_FOUND,
            kv.CommitLayer(pb.CommitLayerRequest(session_id=99, layers=b"\x00\x00"), timeout=t),
        )
        await expect(
            ErrorCode.LEASE_NOT_FOUND, kv.DescribeLease(pb.DescribeLeaseRequest(lease_id="nope"), timeout=t)
        )
        await expect(
            ErrorCode.TOO_LARGE,
            kv.PutExtra(
                pb.PutExtraRequest(namespace="m", sequence_digest=digest, name="big", data=bytes(2000)),
                timeout=t,
            ),
        )
        await expect(
            ErrorCode.INVALID_ARGUMENT,
            kv.PutExtra(pb.PutExtraRequest(namespace="m", sequence_digest=b"short", name="x"), timeout=t),
        )
        await expect(
            ErrorCode.EXTRA_NOT_FOUND,
            kv.GetExtra(pb.GetExtraRequest(namespace="m", sequence_digest=digest, name="other"), timeout=t),
        )
        await expect(ErrorCode.INVALID_ARGUMENT, admin.Evict(pb.EvictRequest(), timeout=t))
        await expect(
            ErrorCode.NAMESPACE_MISMATCH,
            kv.CreateNamespace(
                pb.CreateNamespaceRequest(
                    spec=pb.NamespaceSpec(name="m", page_size=8, num_layers=2, segment_bytes=4096)
                ),
                timeout=t,
            ),
        )
        await expect(
            ErrorCode.INVALID_ARGUMENT, reg.RegisterNode(pb.RegisterNodeRequest(node_id="x"), timeout=t)
        )
        assert (
            await kv.MatchPrefix(pb.MatchPrefixRequest(namespace="m", keys=packed), timeout=t)
        ).num_pages == 0

        deleted = await kv.DeleteNamespace(pb.DeleteNamespaceRequest(name="m"), timeout=t)
        assert deleted.pages_freed == 0
        assert not (await kv.ListNamespaces(pb.ListNamespacesRequest(), timeout=t)).specs
    finally:
        await channel.close()
        await server.stop(0)
        await node_server.stop(0)
        await master.stop()


def test_every_rpc_over_grpc() -> None:
    asyncio.run(scenario())
