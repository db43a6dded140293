"""The client's control-plane connection to the master (grpc.aio on the client's loop thread)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import grpc.aio

from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client.loop import LoopThread
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error

log = logging.getLogger("kvstore.client")

# Codes after which another master address is worth a try: the request was not applied.
_TRY_NEXT = (ErrorCode.NOT_LEADER, ErrorCode.UNAVAILABLE)


def parse_addresses(addresses: str) -> list[str]:
    result = [a.strip() for a in addresses.split(",") if a.strip()]
    if not result:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "no master address given")
    return result


class MasterConnection:
    """Unary calls to the leader, each with a deadline; failures come back as KVStoreError.

    With several master addresses, a call answered NOT_LEADER or UNAVAILABLE
    moves on to the next address (a standby that became leader).
    """

    def __init__(self, addresses: str, loop: LoopThread, timeout_s: float, max_message_bytes: int) -> None:
        self._addresses = parse_addresses(addresses)
        self._current = 0
        self._loop = loop
        self._timeout_s = timeout_s
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.KVStoreStub | None = None

    @property
    def address(self) -> str:
        return self._addresses[self._current]

    def call(self, method: str, request: Any) -> Any:
        """Blocking call from any thread but the loop's."""
        backstop = self._timeout_s * len(self._addresses) + 5.0
        return self._loop.run(self.acall(method, request), timeout_s=backstop)

    async def acall(self, method: str, request: Any) -> Any:
        """The call itself; runs on the loop thread."""
        for attempt in range(len(self._addresses)):
            stub = self._ensure_stub()
            try:
                return await getattr(stub, method)(request, timeout=self._timeout_s)
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if exc.code in _TRY_NEXT and attempt + 1 < len(self._addresses):
                    log.info("master %s: %s; trying the next address", self.address, exc)
                    await self._rotate()
                    continue
                raise exc from None
        raise AssertionError("unreachable")

    def _ensure_stub(self) -> pb_grpc.KVStoreStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._stub = pb_grpc.KVStoreStub(self._channel)
        return self._stub

    async def _rotate(self) -> None:
        await self.aclose()
        self._current = (self._current + 1) % len(self._addresses)

    async def aclose(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    def close(self) -> None:
        if self._loop.running:
            self._loop.run(self.aclose(), timeout_s=5.0)
