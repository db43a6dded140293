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

The hot calls (:data:`STREAMED`: OpenPut, CommitLayer, AcquirePrefix,
ReleaseLease, MatchPrefix...) go over one ``KVStore.Call`` stream per master
address (setting ``control_stream``), multiplexed by id with a future per
request: a message on an open stream costs a fraction of a unary call's CPU
and latency on both sides.  Everything above holds unchanged: an error in a
``CallResponse`` is the KVStoreError the unary call would raise (answered by
kvstore); a stream that breaks fails its pending calls with UNAVAILABLE (not
answered by kvstore: the transport) and the next call opens a new one; each
call has the ``rpc_timeout_ms`` deadline (DEADLINE, as a unary one would); a
master that answers UNIMPLEMENTED for Call gets unary calls from then on.  A
caller that gives up (cancels) drops only its own answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client.loop import LoopThread
from kvstore.errors import ERROR_METADATA_KEY, ErrorCode, KVStoreError, from_fields, from_rpc_error
from kvstore.metadata.base import MetadataBackend

log = logging.getLogger("kvstore.client")

# Calls that change nothing on the master (a lease from AcquirePrefix only pins pages until it
# expires): after DEADLINE_EXCEEDED, from a leader that is paused or cut off, they try elsewhere.
READ_ONLY = frozenset(
    {"MatchPrefix", "AcquirePrefix", "DescribeLease", "GetNamespace", "ListNamespaces", "GetExtra"}
)
# Calls sent over the Call stream when ``control_stream`` is on (kvstore.master.service.STREAMED
# serves the same set): those of every put and get, and the small ones beside them.
STREAMED = frozenset(
    {"OpenPut", "CommitLayer", "AbortPut", "MatchPrefix", "AcquirePrefix", "DescribeLease", "ReleaseLease"}
)
_RESPONSE_TYPES = {
    m.name: getattr(pb, m.output_type.name) for m in pb.DESCRIPTOR.services_by_name["KVStore"].methods
}
_TRANSPORT_STATUSES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
CALL_OVERHEAD_BYTES = 64  # CallRequest's own fields around a request
RETRY_PAUSE_S = (0.02, 0.5)  # first and longest pause between attempts while no leader answers
ETCD_TIMEOUT_S = 2.0  # one leader lookup in etcd


def parse_addresses(addresses: str) -> list[str]:
    return [a.strip() for a in addresses.split(",") if a.strip()]


def _answered_by_kvstore(err: grpc.RpcError) -> bool:
    """Whether a kvstore service produced the error (as opposed to the transport or a foreign server)."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return any(key == ERROR_METADATA_KEY for key, _ in trailing or ())


class _Failure(Exception):
    """One attempt failed with ``error``; ``answered``: a kvstore service said so (not the transport)."""

    def __init__(self, error: KVStoreError, answered: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.answered = answered


class _Unimplemented(Exception):
    """The master does not serve the Call stream (an older one): use unary calls there."""


class _TooLarge(Exception):
    """A request too large for the stream (it would end the stream for everyone): send it unary."""


class _CallStream:
    """One ``KVStore.Call`` stream to one master: requests multiplexed by id, a future per request.

    Requests are queued and written by gRPC's own task that drains the request
    iterator, so a caller cancelled at any point never leaves a half-written
    message behind.  The first failure of the stream ends it for good: every
    pending request fails (``broken``), and the connection opens a new one.
    """

    def __init__(self, stub: pb_grpc.KVStoreStub, address: str, max_message_bytes: int) -> None:
        self.address = address
        self._max_request_bytes = max_message_bytes - CALL_OVERHEAD_BYTES
        self.broken = False
        self.unimplemented = False
        self._why = ""
        self._answered = False  # the master has answered on this stream: it serves Call
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[pb.CallResponse]] = {}
        self._outbox: asyncio.Queue[pb.CallRequest | None] = asyncio.Queue()
        self._call = stub.Call(self._requests())
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"kvstore-call-{address}")

    async def _requests(self) -> AsyncIterator[pb.CallRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        why = "the master ended it"
        try:
            while True:
                answer = await self._call.read()
                if answer is grpc.aio.EOF:
                    break
                self._answered = True
                future = self._pending.pop(answer.id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except grpc.aio.AioRpcError as err:
            # A master without Call answers UNIMPLEMENTED, or, when our first requests race with
            # its refusal, a status of the C core (INTERNAL, UNKNOWN).  Ours never ends a stream
            # with those before it answered anything: only the transport's statuses mean "broke".
            if err.code() == grpc.StatusCode.UNIMPLEMENTED or (
                not self._answered and err.code() not in _TRANSPORT_STATUSES
            ):
                self.unimplemented = True
            why = f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            why = "the client closed it"
        except Exception as exc:  # noqa: BLE001 - anything else ends this stream only
            why = f"{type(exc).__name__}: {exc}"
        self._fail(why)

    def _fail(self, why: str) -> None:
        self.broken = True
        self._why = why
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._error())

    def _error(self) -> Exception:
        if self.unimplemented:
            return _Unimplemented()
        error = KVStoreError(ErrorCode.UNAVAILABLE, f"control stream to {self.address} broke: {self._why}")
        return _Failure(error, answered=False)  # the transport, not a master, said so

    async def call(self, method: str, request: Any, timeout_s: float) -> pb.CallResponse:
        """Send one request and wait for its answer, at most ``timeout_s``; raises _Failure / _Unimplemented."""
        if self.broken:  # checked with no await before the request is registered: see _fail
            raise self._error()
        data = request.SerializeToString()
        if len(data) > self._max_request_bytes:
            raise _TooLarge()
        call_id = next(self._ids)
        future: asyncio.Future[pb.CallResponse] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._outbox.put_nowait(
            pb.CallRequest(id=call_id, method=method, request=data, timeout_ms=max(1, int(timeout_s * 1000)))
        )
        expire = asyncio.get_running_loop().call_later(timeout_s, self._expire, call_id)
        try:
            return await future
        finally:
            # answered, expired, failed or the caller cancelled: only this request is forgotten
            expire.cancel()
            self._pending.pop(call_id, None)

    def _expire(self, call_id: int) -> None:
        future = self._pending.pop(call_id, None)
        if future is not None and not future.done():
            # what a unary call past its deadline raises (the master cancels its side at the same time)
            future.set_exception(_Failure(KVStoreError(ErrorCode.DEADLINE, "Deadline Exceeded"), False))

    async def aclose(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


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
        stream: bool = True,
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
        self._use_stream = stream
        self._max_message_bytes = max_message_bytes
        self._streams: dict[str, _CallStream] = {}
        self._unary_only: set[str] = set()  # masters that answered UNIMPLEMENTED for Call
        self._metadata: MetadataBackend | None = None

    @property
    def _can_fail_over(self) -> bool:
        return bool(self._etcd) or len(self._addresses) > 1

    @property
    def address(self) -> str:
        """The master the next call goes to first."""
        return self._current

    @property
    def backstop_s(self) -> float:
        """How long a blocking caller waits for a call (or calls' coroutine) at most: the calls carry
        their own deadlines and failover waits, this only ends a wait on a loop that stopped answering."""
        return self._timeout_s + self._failover_wait_s + ETCD_TIMEOUT_S + 5.0

    def call(self, method: str, request: Any) -> Any:
        """Blocking call from any thread but the loop's."""
        return self._loop.run(self.acall(method, request), timeout_s=self.backstop_s)

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
                    return await self._attempt(address, method, request)
                except _Failure as failure:
                    exc = last = failure.error
                    wait = self._after_failure(method, address, exc, failure.answered, pause)
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

    async def _attempt(self, address: str, method: str, request: Any) -> Any:
        """One call to one master, over its Call stream or unary; a failure raises _Failure."""
        if self._use_stream and method in STREAMED and address not in self._unary_only:
            try:
                answer = await self._stream(address).call(method, request, self._timeout_s)
            except _Unimplemented:
                log.info("master %s does not serve the Call stream; using unary calls there", address)
                self._unary_only.add(address)
            except _TooLarge:
                pass  # unary, so the size limit fails this call alone, with the unary call's error
            else:
                if answer.error_code:
                    error = from_fields(
                        answer.error_code, answer.error_message, answer.leader, answer.retry_after_ms
                    )
                    raise _Failure(error, answered=True)
                return _RESPONSE_TYPES[method].FromString(answer.response)
        try:
            return await getattr(self._stub(address), method)(request, timeout=self._timeout_s)
        except grpc.RpcError as err:
            raise _Failure(from_rpc_error(err), _answered_by_kvstore(err)) from None

    def _stream(self, address: str) -> _CallStream:
        stream = self._streams.get(address)
        if stream is None or stream.broken:
            stream = self._streams[address] = _CallStream(
                self._stub(address), address, self._max_message_bytes
            )
        return stream

    def _after_failure(
        self, method: str, address: str, exc: KVStoreError, answered: bool, pause: float
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
            if answered:
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
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            await stream.aclose()
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
