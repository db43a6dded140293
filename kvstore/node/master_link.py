"""The node's side of NodeRegistry: register, heartbeat, register again when forgotten.

The master may be down, restarting or failing over; the node keeps serving its
data plane regardless and keeps trying, quietly (one log line every few seconds).
With several master addresses it moves to the next one whenever the current
one fails or says it is not the leader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

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
    ) -> None:
        if not addresses:
            raise ValueError("no master address")
        self._addresses = addresses
        self._current = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._registration = registration
        self._state = state
        self._default_heartbeat_ms = heartbeat_ms
        self._rpc_timeout_s = rpc_timeout_ms / 1000.0
        self._secret_configured = secret_configured
        self._on_registered = on_registered
        self._last_log = float("-inf")
        self.registrations = 0

    def _stub(self) -> tuple[str, pb_grpc.NodeRegistryStub]:
        address = self._addresses[self._current]
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return address, pb_grpc.NodeRegistryStub(channel)

    def _next_master(self) -> None:
        self._current = (self._current + 1) % len(self._addresses)

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
            address, stub = self._stub()
            try:
                response: pb.RegisterNodeResponse = await stub.RegisterNode(
                    self._registration, timeout=self._rpc_timeout_s
                )
            except grpc.aio.AioRpcError as err:
                exc = from_rpc_error(err)
                self._log_quietly(
                    "cannot register with master %s (%s); still serving data, retrying", address, exc
                )
                self._next_master()
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
            address, stub = self._stub()
            try:
                response: pb.HeartbeatResponse = await stub.Heartbeat(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                exc: KVStoreError = from_rpc_error(err)
                self._log_quietly("heartbeat to master %s failed (%s); still serving data", address, exc)
                if exc.code is ErrorCode.NOT_LEADER or len(self._addresses) > 1:
                    self._next_master()
                continue
            self._state.raise_term(response.term)
            if not response.known:
                log.info(
                    "master %s does not know this node (restarted or failed over); registering again", address
                )
                return
