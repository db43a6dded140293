"""The node's side of NodeRegistry: register, heartbeat, register again when forgotten.

The master may be down, restarting or failing over; the node keeps serving its
data plane regardless and keeps trying, quietly (one log line every few seconds).
It finds the leader the way it was told to: through etcd (``find_leader``: the
address etcd records), or through a list of master addresses tried in turn.
A NOT_LEADER answer that names the leader sends it straight there; any other
failure makes it look again (etcd) or move to the next address (list).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error
from kvstore.node.state import NodeState

log = logging.getLogger("kvstore.node.master")

LOG_EVERY_S = 5.0
FIRST_RETRY_S = 0.1
MAX_RETRY_S = 2.0


class MasterLink:
    """Keeps this node registered with the leading master."""

    def __init__(
        self,
        addresses: list[str],
        registration: pb.RegisterNodeRequest,
        state: NodeState,
        heartbeat_ms: int,
        rpc_timeout_ms: int,
        secret_configured: bool,
        on_registered: Callable[[pb.RegisterNodeResponse], None] | None = None,
        find_leader: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        if not addresses and find_leader is None:
            raise ValueError("no master address")
        self._addresses = addresses
        self._find_leader = find_leader
        # where the next call goes; "" means: ask find_leader first
        self._address = "" if find_leader is not None or not addresses else addresses[0]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._registration = registration
        self._state = state
        self._default_heartbeat_ms = heartbeat_ms
        self._rpc_timeout_s = rpc_timeout_ms / 1000.0
        self._secret_configured = secret_configured
        self._on_registered = on_registered
        self._last_log = float("-inf")
        self.registrations = 0

    async def _stub(self) -> tuple[str, pb_grpc.NodeRegistryStub | None]:
        """The master to talk to now, or ("", None) while no leader can be found."""
        if not self._address and self._find_leader is not None:
            try:
                self._address = await self._find_leader() or ""
            except KVStoreError as exc:
                self._log_quietly("cannot look up the leading master (%s); still serving data", exc)
            if not self._address and self._addresses:
                self._address = self._addresses[0]  # etcd has no answer: fall back on the list
        address = self._address
        if not address:
            return "", None
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return address, pb_grpc.NodeRegistryStub(channel)

    def _next_master(self, failed: str, exc: KVStoreError) -> None:
        """After ``failed`` answered ``exc``: its named leader, a fresh lookup, or the next address."""
        if exc.code is ErrorCode.NOT_LEADER and exc.leader and exc.leader != failed:
            self._address = exc.leader
        elif self._find_leader is not None:
            self._address = ""
        elif self._addresses:
            at = self._addresses.index(failed) if failed in self._addresses else -1
            self._address = self._addresses[(at + 1) % len(self._addresses)]

    def _log_quietly(self, text: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning(text, *args)

    async def run(self) -> None:
        """Register, then heartbeat until the master forgets us; forever (cancel to stop)."""
        while True:
            response = await self._register()
            interval_s = (response.heartbeat_ms or self._default_heartbeat_ms) / 1000.0
            await self._heartbeat_until_forgotten(interval_s)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def _register(self) -> pb.RegisterNodeResponse:
        delay = FIRST_RETRY_S
        while True:
            address, stub = await self._stub()
            if stub is None:
                self._log_quietly("no leading master known yet; still serving data, retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)
                continue
            try:
                response: pb.RegisterNodeResponse = await stub.RegisterNode(
                    self._registration, timeout=self._rpc_timeout_s
                )
            except grpc.aio.AioRpcError as err:
                exc = from_rpc_error(err)
                self._log_quietly(
                    "cannot register with master %s (%s); still serving data, retrying", address, exc
                )
                self._next_master(address, exc)
                if exc.leader and exc.leader != address:
                    continue  # go to the leader it named at once
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)
                continue
            self._accept_registration(address, response)
            return response

    def _accept_registration(self, address: str, response: pb.RegisterNodeResponse) -> None:
        self._state.raise_term(response.term)
        secret = bytes(response.grant_secret)
        if secret and not self._secret_configured:
            self._state.grant_secret = secret
        elif secret and secret != self._state.grant_secret:
            log.error(
                "master %s handed out a grant key that differs from this node's --grant-secret: "
                "its grants will not verify here",
                address,
            )
        if self._state.grant_secret is None:
            log.error(
                "master %s sent no grant key and none is configured (--grant-secret): "
                "every data request will be rejected",
                address,
            )
        self.registrations += 1
        self._last_log = float("-inf")
        log.info(
            "registered with master %s (term %d, registration %d)", address, response.term, self.registrations
        )
        if self._on_registered is not None:
            self._on_registered(response)

    async def _heartbeat_until_forgotten(self, interval_s: float) -> None:
        # Short deadline: a heartbeat stuck for the whole RPC timeout would make the node look dead.
        timeout_s = min(self._rpc_timeout_s, max(2 * interval_s, 1.0))
        request = pb.HeartbeatRequest(
            node_id=self._registration.node_id, incarnation=self._registration.incarnation
        )
        while True:
            await asyncio.sleep(interval_s)
            address, stub = await self._stub()
            if stub is None:
                continue
            try:
                response: pb.HeartbeatResponse = await stub.Heartbeat(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                exc: KVStoreError = from_rpc_error(err)
                self._log_quietly("heartbeat to master %s failed (%s); still serving data", address, exc)
                if (
                    exc.code is ErrorCode.NOT_LEADER
                    or len(self._addresses) > 1
                    or self._find_leader is not None
                ):
                    self._next_master(address, exc)
                continue
            self._state.raise_term(response.term)
            if not response.known:
                log.info(
                    "master %s does not know this node (restarted or failed over); registering again", address
                )
                return
