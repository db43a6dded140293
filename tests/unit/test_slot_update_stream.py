"""The master's slot updates over one Node.SlotUpdateStream per node (issue 6).

The master's real :class:`NodeRegistry` talks to a real ``kvstore-node`` process
(no master: the node serves its control port while it keeps trying to
register): rejected batches, term fencing, a node killed, paused and restarted.
An older node without the stream (a servicer of ApplySlotUpdates only) gets
unary calls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error, grpc_errors
from kvstore.master.allocator import RegionAllocator
from kvstore.master.nodes import NodeRecord, NodeRegistry
from kvstore.node.data_server import DataStats
from kvstore.node.inventory import Inventory
from kvstore.node.service import NodeService
from kvstore.node.state import NodeState
from kvstore.tiers.dram import DramPool

RPC_TIMEOUT_S = 1.0
SLOT = 64 << 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class NodeProcess:
    """A kvstore-node on a fixed control port; its master address leads nowhere."""

    def __init__(self, shm_dir: str, control_port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        self.port = control_port
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvstore.node",
                "--master",
                f"127.0.0.1:{free_port()}",
                "--shm-dir",
                shm_dir,
                "--dram",
                "8MiB",
                "--prefault",
                "false",
                "--node-port",
                str(control_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    async def serving(self) -> None:
        deadline = time.monotonic() + 30.0
        while not connects(self.port):
            assert self.proc.poll() is None, "the node exited"
            assert time.monotonic() < deadline, "the node's control port never opened"
            await asyncio.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(timeout=15)


def registry_with(address: str) -> tuple[NodeRegistry, NodeRecord]:
    registry = NodeRegistry(node_ttl_s=30.0, rpc_timeout_s=RPC_TIMEOUT_S, max_message_bytes=64 << 20)
    request = pb.RegisterNodeRequest(
        node_id="n1",
        incarnation=b"\x01" * 16,
        host_id="h",
        control_address=address,
        data_address="127.0.0.1:9",
        regions=[pb.RegionInfo(tier="dram", capacity_bytes=8 << 20)],
    )
    record = registry.add(request, RegionAllocator(8 << 20, 1 << 20, quarantine_s=1.0))
    return registry, record


def assign(slot: int, gen: int, term: int = 1) -> pb.SlotUpdates:
    return pb.SlotUpdates(
        term=term,
        namespaces=["ns"],
        assign_slots=np.array([slot], dtype="<u8").tobytes(),
        assign_generations=np.array([gen], dtype="<u4").tobytes(),
        assign_keys=(slot // SLOT + 1).to_bytes(16, "little"),
        assign_parents=bytes(16),
        assign_slot_bytes=np.array([SLOT], dtype="<u8").tobytes(),
        assign_ns_index=np.array([0], dtype="<u2").tobytes(),
    )


def commit(slot: int, term: int = 1) -> pb.SlotUpdates:
    return pb.SlotUpdates(
        term=term,
        commit_slots=np.array([slot], dtype="<u8").tobytes(),
        commit_layers=np.array([0], dtype="<u2").tobytes(),
        commit_heads=np.array([0, 1], dtype="<u2").tobytes(),
        commit_checksums=np.array([7], dtype="<u8").tobytes(),
    )


async def held_slots(registry: NodeRegistry, record: NodeRecord) -> list[int]:
    inventory = await registry.inventory(record)
    return sorted(np.frombuffer(inventory.slots.assign_slots, dtype="<u8").tolist())


async def send_error(registry: NodeRegistry, record: NodeRecord, batch: pb.SlotUpdates) -> KVStoreError:
    with pytest.raises(KVStoreError) as info:
        await registry.send_updates(record.index, batch)
    return info.value


async def unary_error(registry: NodeRegistry, record: NodeRecord, batch: pb.SlotUpdates) -> KVStoreError:
    """What the unary call answers to ``batch`` (the stream must say the same)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.stub(record).ApplySlotUpdates(batch, timeout=5)
    return from_rpc_error(info.value)


def with_node(
    tmp_path: Any, body: Callable[[NodeProcess, NodeRegistry, NodeRecord], Awaitable[None]]
) -> None:
    async def main() -> None:
        node = NodeProcess(str(tmp_path), free_port())
        registry, record = registry_with(f"127.0.0.1:{node.port}")
        try:
            await node.serving()
            await body(node, registry, record)
        finally:
            await registry.close()
            node.kill(signal.SIGCONT)
            node.kill(signal.SIGKILL)

    asyncio.run(main())


def test_a_rejected_batch_gives_the_unary_error_and_the_stream_goes_on(tmp_path):
    async def body(node: NodeProcess, registry: NodeRegistry, record: NodeRecord) -> None:
        await registry.send_updates(record.index, assign(0, 5))
        stream = record.updates_call
        assert stream is not None and not record.updates_unary

        bad = assign(SLOT, 6)
        bad.assign_keys = b"short"
        err = await send_error(registry, record, bad)
        assert err.code is ErrorCode.INVALID_ARGUMENT
        unary = await unary_error(registry, record, bad)
        assert (err.code, err.message) == (unary.code, unary.message)

        # a slot the node does not have: the check of the whole batch rejects it, nothing applied
        beyond = assign(1 << 40, 6)
        err = await send_error(registry, record, beyond)
        unary = await unary_error(registry, record, beyond)
        assert (err.code, err.message) == (unary.code, unary.message)

        # the same stream carries the next batches, in order
        await registry.send_updates(record.index, assign(SLOT, 6))
        await registry.send_updates(record.index, commit(SLOT))
        assert record.updates_call is stream
        assert await held_slots(registry, record) == [0, SLOT]

    with_node(tmp_path, body)


def test_a_stale_term_is_fenced_over_the_stream(tmp_path):
    async def body(node: NodeProcess, registry: NodeRegistry, record: NodeRecord) -> None:
        await registry.send_updates(record.index, assign(0, 5, term=7))
        stream = record.updates_call
        stale = assign(SLOT, 6, term=6)
        err = await send_error(registry, record, stale)
        assert err.code is ErrorCode.NOT_LEADER and "term 6" in err.message
        unary = await unary_error(registry, record, stale)
        assert (err.code, err.message) == (unary.code, unary.message)
        assert await held_slots(registry, record) == [0]
        # a newer leader's batch goes through, on the same stream; the old term stays fenced
        await registry.send_updates(record.index, assign(SLOT, 6, term=8))
        assert (await send_error(registry, record, assign(2 * SLOT, 7, term=7))).code is ErrorCode.NOT_LEADER
        assert record.updates_call is stream
        assert await held_slots(registry, record) == [0, SLOT]

    with_node(tmp_path, body)


def test_a_killed_node_fails_the_next_send_and_its_successor_gets_batches(tmp_path):
    async def body(node: NodeProcess, registry: NodeRegistry, record: NodeRecord) -> None:
        await registry.send_updates(record.index, assign(0, 5))
        node.kill(signal.SIGKILL)
        started = time.monotonic()
        err = await send_error(registry, record, assign(SLOT, 6))
        assert err.code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE), err
        assert time.monotonic() - started < RPC_TIMEOUT_S + 0.5
        assert record.updates_call is None or record.updates_call.done()
        # still down: fails again, cleanly
        assert (await send_error(registry, record, assign(SLOT, 6))).code in (
            ErrorCode.UNAVAILABLE,
            ErrorCode.DEADLINE,
        )

        # a new incarnation on the same address: batches flow again (once the channel reconnects)
        successor = NodeProcess(str(tmp_path), node.port)
        try:
            await successor.serving()
            deadline = time.monotonic() + 20
            while True:
                try:
                    await registry.send_updates(record.index, assign(SLOT, 6))
                    break
                except KVStoreError as exc:
                    assert exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE), exc
                    assert time.monotonic() < deadline, f"no batch reached the restarted node: {exc}"
                    await asyncio.sleep(0.1)
            await registry.send_updates(record.index, commit(SLOT))
            assert await held_slots(registry, record) == [SLOT]  # slot 0 went with the old incarnation
            assert not record.updates_unary
        finally:
            successor.kill(signal.SIGKILL)

    with_node(tmp_path, body)


def test_a_node_that_does_not_answer_times_out_and_a_new_stream_follows(tmp_path):
    async def body(node: NodeProcess, registry: NodeRegistry, record: NodeRecord) -> None:
        await registry.send_updates(record.index, assign(0, 5))
        stream = record.updates_call
        node.kill(signal.SIGSTOP)
        started = time.monotonic()
        err = await send_error(registry, record, assign(SLOT, 6))
        assert err.code is ErrorCode.DEADLINE, err
        assert RPC_TIMEOUT_S - 0.1 < time.monotonic() - started < RPC_TIMEOUT_S + 1.0
        assert record.updates_call is None and stream.cancelled()
        node.kill(signal.SIGCONT)
        # the timed-out batch may have been applied or not (as with a unary deadline): resend it
        await registry.send_updates(record.index, assign(SLOT, 6))
        await registry.send_updates(record.index, commit(SLOT))
        assert record.updates_call is not None and record.updates_call is not stream
        assert await held_slots(registry, record) == [0, SLOT]

    with_node(tmp_path, body)


class OlderNode(pb_grpc.NodeServicer):
    """A node from before SlotUpdateStream: ApplySlotUpdates only."""

    def __init__(self) -> None:
        self.batches: list[pb.SlotUpdates] = []

    @grpc_errors
    async def ApplySlotUpdates(self, request: pb.SlotUpdates, context: Any) -> pb.SlotUpdatesResponse:
        self.batches.append(request)
        if request.term < 3:
            raise KVStoreError(ErrorCode.NOT_LEADER, "old term")
        return pb.SlotUpdatesResponse(applied=1)


async def serve_node(servicer: Any) -> tuple[grpc.aio.Server, int]:
    """An in-process gRPC server for a Node servicer on a free port."""
    server = grpc.aio.server()
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_an_older_node_gets_unary_calls():
    async def main() -> None:
        older = OlderNode()
        server, port = await serve_node(older)
        registry, record = registry_with(f"127.0.0.1:{port}")
        try:
            await registry.send_updates(record.index, assign(0, 5, term=3))
            assert record.updates_unary and record.updates_call is None
            await registry.send_updates(record.index, assign(SLOT, 6, term=3))
            assert [b.term for b in older.batches] == [3, 3]  # each batch applied once
            # the unary path raises KVStoreError as well
            err = await send_error(registry, record, assign(SLOT, 6, term=2))
            assert (err.code, err.message) == (ErrorCode.NOT_LEADER, "old term")
        finally:
            await registry.close()
            await server.stop(0)

    asyncio.run(main())


def test_closing_the_node_service_ends_the_streams_so_a_graceful_stop_is_quick(tmp_path):
    async def main() -> None:
        pool = DramPool.create(str(tmp_path), "svc", 4 << 20, prefault=False)
        service = NodeService(
            NodeState("svc", pool.header.incarnation, b"s" * 32),
            pool,
            Inventory(pool.capacity_bytes),
            DataStats(),
        )
        server, port = await serve_node(service)
        registry, record = registry_with(f"127.0.0.1:{port}")
        try:
            await registry.send_updates(record.index, assign(0, 5))
            await service.close()
            started = time.monotonic()
            await server.stop(5.0)
            assert time.monotonic() - started < 1.0
            err = await send_error(registry, record, assign(SLOT, 6))
            assert err.code is ErrorCode.UNAVAILABLE, err
        finally:
            await registry.close()
            await server.stop(0)
            pool.close()

    asyncio.run(main())
