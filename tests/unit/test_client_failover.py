"""The client's control connection following the leader (kvstore.client.control), against fake masters."""

from __future__ import annotations

import socket
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
from kvstore.errors import ErrorCode, KVStoreError


class FakeMaster(pb_grpc.KVStoreServicer):
    """Answers MatchPrefix as a leader (``pages``), or refuses it with ``refusal``."""

    def __init__(self) -> None:
        self.refusal: KVStoreError | None = None
        self.calls = 0

    def MatchPrefix(self, request: pb.MatchPrefixRequest, context: Any) -> pb.MatchPrefixResponse:
        self.calls += 1
        if self.refusal is not None:
            context.set_trailing_metadata(self.refusal.trailing_metadata())
            context.abort(self.refusal.status, str(self.refusal))
        return pb.MatchPrefixResponse(num_pages=3)


@pytest.fixture
def masters() -> Iterator[list[tuple[str, FakeMaster]]]:
    servers, found = [], []
    for _ in range(2):
        fake = FakeMaster()
        server = grpc.server(futures.ThreadPoolExecutor(2))
        pb_grpc.add_KVStoreServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        found.append((f"127.0.0.1:{port}", fake))
    yield found
    for server in servers:
        server.stop(0)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def connect(addresses: str, loop: LoopThread, wait_s: float = 2.0) -> MasterConnection:
    return MasterConnection(addresses, loop, 2.0, 1 << 20, failover_wait_s=wait_s)


def match(connection: MasterConnection) -> int:
    return int(connection.call("MatchPrefix", pb.MatchPrefixRequest(namespace="n")).num_pages)


def test_a_standby_sends_the_call_straight_to_the_leader_it_names(masters: Any, loop: LoopThread) -> None:
    (standby_address, standby), (leader_address, leader) = masters
    standby.refusal = KVStoreError(ErrorCode.NOT_LEADER, "standby", leader=leader_address)
    connection = connect(standby_address, loop)  # only the standby is known
    assert match(connection) == 3 and connection.address == leader_address
    assert (standby.calls, leader.calls) == (1, 1)
    connection.close()


def test_a_dead_master_is_skipped_and_an_election_waited_out(masters: Any, loop: LoopThread) -> None:
    (first_address, first), (second_address, _) = masters
    first.refusal = KVStoreError(ErrorCode.NOT_LEADER, "no leader now")  # an election under way
    connection = connect(f"{dead_address()},{first_address}", loop)
    started = time.monotonic()
    with pytest.raises(KVStoreError) as err:
        match(connection)
    assert err.value.code is ErrorCode.UNAVAILABLE and "no leading master" in err.value.message
    assert 2.0 <= time.monotonic() - started < 4.0  # bounded by failover_wait
    first.refusal = None  # the election is over
    assert match(connection) == 3
    connection.close()


def test_a_retry_hint_is_followed_only_when_it_fits(masters: Any, loop: LoopThread) -> None:
    (address, master), _ = masters
    master.refusal = KVStoreError(ErrorCode.UNAVAILABLE, "warming up", retry_after_ms=5000)
    connection = connect(address, loop, wait_s=1.0)
    started = time.monotonic()
    with pytest.raises(KVStoreError) as err:
        match(connection)
    assert err.value.message == "warming up" and time.monotonic() - started < 0.5  # failed fast
    master.refusal = KVStoreError(ErrorCode.UNAVAILABLE, "rebuilding", retry_after_ms=50)
    calls = master.calls

    def rebuilt() -> None:
        master.refusal = None

    loop.loop.call_later(0.2, rebuilt)
    assert match(connection) == 3 and master.calls - calls >= 2
    connection.close()


def test_a_single_unreachable_master_fails_at_once(loop: LoopThread) -> None:
    connection = connect(dead_address(), loop, wait_s=10.0)
    started = time.monotonic()
    with pytest.raises(KVStoreError) as err:
        match(connection)
    assert err.value.code is ErrorCode.UNAVAILABLE and time.monotonic() - started < 2.0
    connection.close()
