"""The client's hot master calls over one multiplexed Call stream (kvstore.client.control, KVStore.Call).

Real master and node processes (kvstore.testing.Cluster): many calls share one
stream and each gets its own answer; an error is the KVStoreError the unary
call raises; a standby answers NOT_LEADER naming the leader; a paused master
gives DEADLINE, a killed one fails the pending calls with UNAVAILABLE and the
next call opens a new stream; a cancelled caller leaves the stream to the
others; ``control_stream = false`` sends unary calls; a master without Call
gets unary calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client.control import MasterConnection
from kvstore.client.loop import LoopThread
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error
from kvstore.etcd_server import find_etcd
from kvstore.keys import namespace_root, packed_page_keys
from kvstore.testing import FAST_ETCD_SETTINGS, Cluster, page_bytes, prompt

PAGE = 16
LAYERS = 2
SEGMENT = 4096
MAX_MESSAGE = 64 << 20


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def connect(address: str, loop: LoopThread, *, timeout_s: float = 5.0, **kw: Any) -> MasterConnection:
    return MasterConnection(address, loop, timeout_s, MAX_MESSAGE, **kw)


def outcome(connection: MasterConnection, method: str, request: Any) -> Any:
    """The answer, or the (code, message, leader, retry hint) of the KVStoreError raised."""
    try:
        return connection.call(method, request)
    except KVStoreError as exc:
        return (exc.code, exc.message, exc.leader, exc.retry_after_ms)


def streams_of(connection: MasterConnection) -> dict[str, Any]:
    return dict(connection._streams)


def release(lease: str = "none") -> pb.ReleaseLeaseRequest:
    return pb.ReleaseLeaseRequest(lease_id=lease)


def test_many_concurrent_calls_share_one_stream_and_get_their_own_answers(
    cluster: Cluster, client: Any, namespace: str, loop: LoopThread
) -> None:
    c = client(cluster, namespace)
    c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
    root = namespace_root(namespace)
    sequences = []
    for pages in range(1, 6):
        tokens = prompt(100 + pages, (pages + 2) * PAGE)
        for layer in range(LAYERS):
            c.put_layer(tokens[: pages * PAGE], layer, page_bytes(layer, pages, SEGMENT))
        sequences.append((packed_page_keys(root, tokens, PAGE), pages))
    connection = connect(cluster.master_address, loop)

    async def many() -> list[Any]:
        calls = []
        for i in range(300):
            keys, _ = sequences[i % len(sequences)]
            name = namespace if i % 7 else "test/no-such-namespace"
            calls.append(connection.acall("MatchPrefix", pb.MatchPrefixRequest(namespace=name, keys=keys)))
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = loop.run(many(), timeout_s=60)
    for i, answer in enumerate(answers):
        if i % 7:
            assert answer.num_pages == sequences[i % len(sequences)][1], i
        else:
            assert isinstance(answer, KVStoreError) and answer.code is ErrorCode.NAMESPACE_NOT_FOUND
    (stream,) = streams_of(connection).values()  # one stream carried them all
    assert not stream.broken and next(stream._ids) == 301
    connection.close()


def test_errors_over_the_stream_are_the_unary_errors(
    cluster: Cluster, client: Any, namespace: str, loop: LoopThread
) -> None:
    client(cluster, namespace).create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
    streamed = connect(cluster.master_address, loop)
    unary = connect(cluster.master_address, loop, stream=False)
    keys = packed_page_keys(namespace_root(namespace), prompt(7, 2 * PAGE), PAGE)
    cases = [
        ("MatchPrefix", pb.MatchPrefixRequest(namespace="test/absent", keys=keys)),  # NAMESPACE_NOT_FOUND
        ("MatchPrefix", pb.MatchPrefixRequest(namespace=namespace, keys=keys[:13])),  # BAD_KEYS
        ("MatchPrefix", pb.MatchPrefixRequest(namespace="", keys=keys)),  # INVALID_ARGUMENT
        ("OpenPut", pb.OpenPutRequest(namespace=namespace, keys=keys, tp_rank=3, tp_size=2)),  # BAD_RANGE
        ("OpenPut", pb.OpenPutRequest(namespace=namespace)),  # BAD_KEYS: no page keys
        ("CommitLayer", pb.CommitLayerRequest(session_id=12345, layers=b"\0")),  # odd packed size
        ("CommitLayer", pb.CommitLayerRequest(session_id=12345)),  # SESSION_NOT_FOUND
        ("DescribeLease", pb.DescribeLeaseRequest(lease_id="nope")),  # LEASE_NOT_FOUND
        ("AcquirePrefix", pb.AcquirePrefixRequest(namespace="test/absent", keys=keys)),
    ]
    for method, request in cases:
        got, expected = outcome(streamed, method, request), outcome(unary, method, request)
        assert isinstance(expected, tuple), (method, expected)
        assert got == expected, method
    # and the answers that are not errors
    assert outcome(streamed, "ReleaseLease", release()) == outcome(unary, "ReleaseLease", release())
    assert streams_of(streamed) and not streams_of(unary)
    streamed.close()
    unary.close()


def test_a_cancelled_caller_leaves_the_stream_to_the_others(cluster: Cluster, loop: LoopThread) -> None:
    connection = connect(cluster.master_address, loop)

    async def cancel_some() -> list[Any]:
        tasks = [asyncio.ensure_future(connection.acall("ReleaseLease", release())) for _ in range(50)]
        await asyncio.sleep(0)  # sent, not answered yet
        for task in tasks[::2]:
            task.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    answers = loop.run(cancel_some(), timeout_s=30)
    assert all(isinstance(a, asyncio.CancelledError) for a in answers[::2])
    assert all(isinstance(a, pb.ReleaseLeaseResponse) for a in answers[1::2])
    (stream,) = streams_of(connection).values()
    assert connection.call("ReleaseLease", release()).released is False
    assert streams_of(connection)[cluster.master_address] is stream and not stream.broken
    assert not stream._pending  # nothing left behind by the cancelled callers
    connection.close()


def test_paused_then_killed_master(make_cluster: Any, loop: LoopThread) -> None:
    """Paused: DEADLINE after rpc_timeout_ms; killed: pending calls fail UNAVAILABLE at once; restarted: served."""
    cluster = make_cluster(nodes=1)
    connection = connect(cluster.master_address, loop, timeout_s=1.0)
    assert connection.call("ReleaseLease", release()).released is False
    first = streams_of(connection)[cluster.master_address]
    cluster.pause_master(0)
    started = time.monotonic()
    code, message, _, _ = outcome(connection, "ReleaseLease", release())
    assert code is ErrorCode.DEADLINE and 0.9 < time.monotonic() - started < 3.0
    assert not first.broken  # a late answer is dropped; the stream stays
    # calls in flight on the paused master when it is killed
    pending = [
        loop.submit(connection.acall("MatchPrefix", pb.MatchPrefixRequest(namespace="n"))) for _ in range(5)
    ]
    time.sleep(0.3)
    killed_at = time.monotonic()
    cluster.kill_master(0)
    for future in pending:
        with pytest.raises(KVStoreError) as err:
            future.result(10)
        assert err.value.code is ErrorCode.UNAVAILABLE and "broke" in err.value.message
    assert time.monotonic() - killed_at < 0.9  # the broken stream, not the deadline
    assert first.broken
    cluster.restart_master(0)
    assert connection.call("ReleaseLease", release()).released is False  # a new stream
    second = streams_of(connection)[cluster.master_address]
    assert second is not first and not second.broken
    connection.close()


@pytest.fixture
def two_masters(attach: Any) -> Iterator[Cluster]:
    try:
        find_etcd()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    cluster = Cluster(1, masters=2, etcd=True, dram="32MiB", **FAST_ETCD_SETTINGS)  # type: ignore[arg-type]
    attach(cluster.start())
    yield cluster
    cluster.stop()


def test_a_standby_answers_not_leader_naming_the_leader(two_masters: Cluster, loop: LoopThread) -> None:
    cluster = two_masters
    leader = cluster.master_addresses[cluster.wait_leader()]
    (standby,) = [a for a in cluster.master_addresses if a != leader]
    # the standby's answer over the stream is the unary one
    streamed = connect(standby, loop, failover_wait_s=0.0)
    unary = connect(standby, loop, failover_wait_s=0.0, stream=False)
    with grpc.insecure_channel(standby) as channel, pytest.raises(grpc.RpcError) as raw:
        pb_grpc.KVStoreStub(channel).ReleaseLease(release(), timeout=5)
    refusal = from_rpc_error(raw.value)
    assert refusal.code is ErrorCode.NOT_LEADER and refusal.leader == leader

    async def one_attempt(connection: MasterConnection) -> Any:
        try:
            return await connection._attempt(standby, "ReleaseLease", release())
        except Exception as exc:  # noqa: BLE001 - the attempt's failure is what is compared
            return exc

    for connection in (streamed, unary):
        failure = loop.run(one_attempt(connection), timeout_s=10)
        error = failure.error
        assert (error.code, error.message, error.leader) == (refusal.code, refusal.message, leader)
        assert failure.answered
    assert standby in streams_of(streamed)
    # and a connection that knows only the standby follows it to the leader, over streams
    follower = connect(standby, loop, failover_wait_s=5.0)
    assert follower.call("ReleaseLease", release()).released is False
    assert follower.address == leader and set(streams_of(follower)) == {standby, leader}
    for connection in (streamed, unary, follower):
        connection.close()


def test_the_off_switch_sends_unary_calls(cluster: Cluster, client: Any, namespace: str) -> None:
    tokens = prompt(9, 3 * PAGE)
    for on in (False, True):
        c = client(cluster, namespace, control_stream=on)
        c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
        for layer in range(LAYERS):
            c.put_layer(tokens, layer, page_bytes(layer, 3, SEGMENT))
        assert c.get_prefix(tokens).num_pages == 3
        assert bool(streams_of(c._master)) is on


class OldMaster(pb_grpc.KVStoreServicer):
    """A master from before the Call stream: only unary MatchPrefix."""

    def MatchPrefix(self, request: pb.MatchPrefixRequest, context: Any) -> pb.MatchPrefixResponse:
        return pb.MatchPrefixResponse(num_pages=3)


def test_a_master_without_the_stream_gets_unary_calls(loop: LoopThread) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_KVStoreServicer_to_server(OldMaster(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        connection = connect(address, loop)
        for _ in range(2):
            assert connection.call("MatchPrefix", pb.MatchPrefixRequest(namespace="n")).num_pages == 3
        assert address in connection._unary_only
        connection.close()
    finally:
        server.stop(0)


def test_a_master_stopping_ends_its_streams_at_once(make_cluster: Any, loop: LoopThread) -> None:
    """SIGTERM: open streams end (their clients retry elsewhere) rather than hold the stop for its grace."""
    from kvstore.master.__main__ import GRACE_S

    cluster = make_cluster(nodes=1)
    connection = connect(cluster.master_address, loop)
    assert connection.call("ReleaseLease", release()).released is False
    stream = streams_of(connection)[cluster.master_address]
    started = time.monotonic()
    cluster.stop_master(0)
    assert time.monotonic() - started < GRACE_S
    code, _, _, _ = outcome(connection, "ReleaseLease", release())
    assert code is ErrorCode.UNAVAILABLE and stream.broken
    connection.close()


def test_bad_envelopes_get_their_own_errors_and_the_stream_goes_on(cluster: Cluster) -> None:
    """A raw Call stream (no SDK): unknown methods, unparsable requests and a tiny deadline are answered in band."""

    async def main() -> dict[int, pb.CallResponse]:
        async with grpc.aio.insecure_channel(cluster.master_address) as channel:
            call = pb_grpc.KVStoreStub(channel).Call()
            sent = [
                pb.CallRequest(id=1, method="DeleteEverything", request=b""),
                pb.CallRequest(id=2, method="GetStats", request=b""),  # a real RPC, but not over Call
                pb.CallRequest(id=3, method="OpenPut", request=b"\xff\xff\xff not protobuf"),
                pb.CallRequest(id=4, method="ReleaseLease", request=release().SerializeToString()),
            ]
            for request in sent:
                await call.write(request)
            answers = {}
            for _ in sent:
                answer = await asyncio.wait_for(call.read(), 5.0)
                answers[answer.id] = answer
            await call.done_writing()
            return answers

    answers = asyncio.run(main())
    assert answers[1].error_code == answers[2].error_code == ErrorCode.INVALID_ARGUMENT.name
    assert "cannot be called over Call" in answers[1].error_message
    assert answers[3].error_code == ErrorCode.INVALID_ARGUMENT.name
    assert "does not parse" in answers[3].error_message
    assert not answers[4].error_code  # the stream still answers good requests
