"""The client's control-plane connection to the leading master (grpc.aio on the client's loop thread).

The caller never needs to know which master leads.  The connection finds it
through a list of master addresses (``master = "a:50051,b:50051"``) and/or etcd
(``etcd = "host:2379"``: it reads the leader's address there), and follows a
leader change within a bounded time:

- NOT_LEADER naming the leader (message and ``kvstore-leader`` metadata): the
  call goes straight there.  NOT_LEADER without a leader (an election is under
  way) and an unreachable master (UNAVAILABLE from the transport): the next
  address is tried, or etcd is asked again, after a short pause that doubles
  (20 ms up to 0.5 s).
- A transient refusal with a retry hint (a new leader still rebuilding its
  index) is retried after the hint.  A hint longer than the time left (a new
  leader warming up before it allocates) fails at once: a put is worth less
  than the time an engine would wait for it.
- With a single master address and no etcd there is nobody to fail over to:
  an unreachable master fails the call at once, as it always did.
- DEADLINE_EXCEEDED (a leader that is paused or cut off answers nothing) moves
  on to the next master or a fresh look in etcd; a read-only call (match,
  acquire, describe...) is retried there, any other is raised, as it may have
  been applied.
- Everything else is raised as is.

The whole retrying is bounded by ``failover_wait_ms``, after which the call
fails with UNAVAILABLE.  Each attempt has the ``rpc_timeout_ms`` deadline.
Retried calls are safe: a master that answers NOT_LEADER or cannot be reached
applied nothing, and the rare request that was applied before its connection
broke is one the protocol tolerates twice (a second OpenPut session expires
unused; commits, releases and namespace creation are idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc
import grpc.aio

from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client.loop import LoopThread
from kvstore.errors import ERROR_METADATA_KEY, ErrorCode, KVStoreError, from_rpc_error
from kvstore.metadata.base import MetadataBackend

log = logging.getLogger("kvstore.client")

# Calls that change nothing on the master (a lease from AcquirePrefix only pins pages until it
# expires): after DEADLINE_EXCEEDED, from a leader that is paused or cut off, they try elsewhere.
READ_ONLY = frozenset(
    {"MatchPrefix", "AcquirePrefix", "DescribeLease", "GetNamespace", "ListNamespaces", "GetExtra"}
)
RETRY_PAUSE_S = (0.02, 0.5)  # first and longest pause between attempts while no leader answers
ETCD_TIMEOUT_S = 2.0  # one leader lookup in etcd


def parse_addresses(addresses: str) -> list[str]:
    return [a.strip() for a in addresses.split(",") if a.strip()]


def _answered_by_kvstore(err: grpc.RpcError) -> bool:
    """Whether a kvstore service produced the error (as opposed to the transport or a foreign server)."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return any(key == ERROR_METADATA_KEY for key, _ in trailing or ())


class MasterConnection:
    """Unary calls to the leader, each with a deadline; failures come back as KVStoreError."""

    def __init__(
        self,
        addresses: str,
        loop: LoopThread,
        timeout_s: float,
        max_message_bytes: int,
        *,
        etcd: str = "",
        cluster: str = "default",
        failover_wait_s: float = 10.0,
    ) -> None:
        self._addresses = parse_addresses(addresses)
        self._etcd = etcd.strip()
        if not self._addresses and not self._etcd:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "no master address given (nor etcd to find one)")
        self._cluster = cluster
        self._loop = loop
        self._timeout_s = timeout_s
        self._failover_wait_s = max(0.0, failover_wait_s)
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._current = self._addresses[0] if self._addresses else ""
        self._look_up = bool(self._etcd)  # ask etcd before the next attempt
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.KVStoreStub]] = {}
        self._metadata: MetadataBackend | None = None

    @property
    def _can_fail_over(self) -> bool:
        return bool(self._etcd) or len(self._addresses) > 1

    @property
    def address(self) -> str:
        """The master the next call goes to first."""
        return self._current

    def call(self, method: str, request: Any) -> Any:
        """Blocking call from any thread but the loop's."""
        backstop = self._timeout_s + self._failover_wait_s + ETCD_TIMEOUT_S + 5.0
        return self._loop.run(self.acall(method, request), timeout_s=backstop)

    async def acall(self, method: str, request: Any) -> Any:
        """The call itself, following the leader; runs on the loop thread."""
        give_up = time.monotonic() + self._failover_wait_s
        pause = RETRY_PAUSE_S[0]
        last: KVStoreError | None = None
        while True:
            address = await self._leader_address()
            wait, hinted = pause, False
            if address:
                try:
                    return await getattr(self._stub(address), method)(request, timeout=self._timeout_s)
                except grpc.RpcError as err:
                    exc = from_rpc_error(err)
                    last = exc
                    wait = self._after_failure(method, address, err, exc, pause)
                    if wait < 0:
                        raise exc from None
                    hinted = exc.retry_after_ms > 0
            left = give_up - time.monotonic()
            if hinted and wait > left:
                assert last is not None
                raise last  # the server says when; it is later than this call may wait
            if left <= 0:
                why = f"; last answer: {last}" if last is not None else ""
                raise KVStoreError(
                    ErrorCode.UNAVAILABLE,
                    f"no leading master answered {method} within {self._failover_wait_s:.1f} s "
                    f"(masters {','.join(self._addresses) or '-'}{', etcd ' + self._etcd if self._etcd else ''}){why}",
                ) from None
            if wait > 0:
                await asyncio.sleep(min(wait, left))
            if wait >= pause:
                pause = min(pause * 2, RETRY_PAUSE_S[1])

    def _after_failure(
        self, method: str, address: str, err: grpc.RpcError, exc: KVStoreError, pause: float
    ) -> float:
        """How long to wait before the next attempt (0: at once), or -1 to raise ``exc`` now."""
        if exc.code is ErrorCode.NOT_LEADER:
            if exc.leader and exc.leader != address:
                log.info("master %s is not the leader; following it to %s", address, exc.leader)
                self._current = exc.leader
                return 0.0
            self._next_master(address)
            return pause
        if exc.code is ErrorCode.UNAVAILABLE:
            if exc.retry_after_ms:
                return exc.retry_after_ms / 1000.0
            if _answered_by_kvstore(err):
                return -1.0  # the leader itself says no (a node did not answer): not a leader change
            if not self._can_fail_over:
                return -1.0  # one master and no etcd: nobody else could answer; fail fast
            log.info("master %s unreachable (%s); looking for the leader", address, exc.message)
            self._next_master(address)
            return pause
        if exc.code is ErrorCode.DEADLINE and self._can_fail_over:
            self._next_master(address)  # the next attempt looks for the leader elsewhere first
            if method in READ_ONLY:
                return 0.0
        return -1.0

    def _next_master(self, failed: str) -> None:
        if self._etcd:
            self._look_up = True
        if self._addresses:
            at = self._addresses.index(failed) if failed in self._addresses else -1
            self._current = self._addresses[(at + 1) % len(self._addresses)]

    async def _leader_address(self) -> str:
        """The address to try: etcd's leader when a lookup is due, else the current one."""
        if not self._look_up:
            return self._current
        try:
            leader = await self._etcd_leader()
        except KVStoreError as exc:
            log.info("cannot read the leader from etcd (%s); trying the master list", exc.message)
            return self._current
        if leader is None:
            return ""  # an election is under way: wait and ask again
        self._look_up = False
        self._current = leader
        return leader

    async def _etcd_leader(self) -> str | None:
        if self._metadata is None:
            from kvstore.metadata import create_backend

            self._metadata = create_backend(self._etcd, cluster=self._cluster, timeout_s=ETCD_TIMEOUT_S)
        return await self._metadata.leader()

    def _stub(self, address: str) -> pb_grpc.KVStoreStub:
        held = self._stubs.get(address)
        if held is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            held = self._stubs[address] = (channel, pb_grpc.KVStoreStub(channel))
        return held[1]

    async def aclose(self) -> None:
        stubs, self._stubs = list(self._stubs.values()), {}
        for channel, _ in stubs:
            await channel.close()
        metadata, self._metadata = self._metadata, None
        if metadata is not None:
            with contextlib.suppress(KVStoreError):
                await metadata.close()

    def close(self) -> None:
        if self._loop.running:
            self._loop.run(self.aclose(), timeout_s=5.0)
