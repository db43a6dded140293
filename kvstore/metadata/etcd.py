"""Metadata backend on etcd (v3 API through ``aetcd``; every aetcd import stays in this module).

Key layout under ``<root>/<cluster>/`` (default root ``/kvstore``), so several
clusters can share one etcd:

==========================  =========================================  ==================
key                          value                                      lease
==========================  =========================================  ==================
``namespaces/<name>``        serialized NamespaceSpec                   none
``values/<key>``             cluster-wide value (grant secret, ...)     none
``config``                   cluster config blob (TOML/JSON)            none
``nodes/<node_id>``          node info (opaque bytes)                   the node's lease
``election/leader``          JSON ``{"address", "term"}``               the leader's lease
``election/term``            decimal term of the latest leader          none
``masters/<address>``        empty: a master leading or campaigning     that master's lease
==========================  =========================================  ==================

Election: a candidate holds one lease (kept alive in a task every TTL/3).  It
takes ``election/leader`` in a transaction that requires the key to be absent
and ``election/term`` unchanged since it was read, and bumps the term in the
same transaction, so terms go 1, 2, 3... with exactly one leader per term.
Standbys watch the leader key and retry when it goes (lease revoked/expired).
The leader key's create revision is the fencing token: fenced writes compare
it in their transaction, so a deposed leader's writes fail in etcd itself.

The leader also knows locally how long its lease is provably alive: the send
time of the last acknowledged keepalive plus the TTL (less a margin).  Past
that, :meth:`EtcdBackend.leading` is False for good, even before any I/O, so a
leader that was paused longer than its TTL does not act on waking.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import grpc

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.metadata.base import (
    NODE_DELETE,
    NODE_PUT,
    NODE_RESYNC,
    Leadership,
    MetadataBackend,
    NodeEvent,
    NodeRegistration,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ROOT = "/kvstore"
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_LEADER_TTL_S = 3
# Fraction of the lease TTL the leader keeps in hand: it stops leading that much
# before etcd could expire its lease, to absorb clock-rate differences.
LEASE_SAFETY_MARGIN = 0.1
WATCH_BACKOFF_S = (0.05, 1.0)  # first and longest pause between watch re-establishments

# gRPC channel settings: reconnect quickly after an etcd restart (the default
# backoff grows to two minutes), and detect a silent etcd (SIGSTOP, partition)
# on long-lived watch streams.  etcd refuses pings more often than every 5 s
# (--grpc-keepalive-min-time), and pings without an active stream.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
}


class _LeaseNotFound(Exception):
    """etcd does not know the lease (expired or revoked)."""


async def _watch_prefix_from(client: Any, prefix: bytes, revision: int) -> Any:
    return await client.watch_prefix(prefix, start_revision=revision)


async def _put_with_lease(client: Any, key: bytes, value: bytes, lease_id: int) -> Any:
    return await client.put(key, value, lease=lease_id)


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"h1:2379,h2:2379"`` (or a list; ``http://`` and IPv6 ``[::1]:2379`` accepted) -> [(host, port)]."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        for scheme in ("http://", "https://"):
            if item.startswith(scheme):
                item = item[len(scheme) :]
        host, sep, port_text = item.rstrip("/").rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"etcd endpoint {raw.strip()!r} is not HOST:PORT")
        parsed.append((host, int(port_text)))
    if not parsed:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT, "no etcd endpoint given (expected HOST:PORT[,HOST:PORT...])"
        )
    return parsed


def cluster_prefix(cluster: str, root: str = DEFAULT_ROOT) -> bytes:
    """The key prefix of one cluster, e.g. ``b"/kvstore/default/"``."""
    if not cluster or "/" in cluster or not cluster.isprintable() or cluster.strip() != cluster:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT,
            f"cluster name {cluster!r} must be non-empty, printable and without '/'",
        )
    return f"{root.rstrip('/')}/{cluster}/".encode()


class _KeptLease:
    """A lease this process keeps alive in a task; ``lost`` is final once set."""

    def __init__(self, lease_id: int, ttl_s: int, sent_at: float) -> None:
        self.lease_id = lease_id
        self.ttl_s = ttl_s
        self.deadline = sent_at + ttl_s * (1.0 - LEASE_SAFETY_MARGIN)
        self.lost = asyncio.Event()
        self.reason = ""
        self.task: asyncio.Task[None] | None = None
        self.leadership: Leadership | None = None
        self.candidate_key: bytes | None = None

    def lose(self, reason: str, expected: bool = False) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()
            if self.leadership is not None:
                level = logging.INFO if expected else logging.WARNING
                log.log(level, "leadership of term %d ended: %s", self.leadership.term, reason)

    def alive(self) -> bool:
        if not self.lost.is_set() and time.monotonic() >= self.deadline:
            self.lose(f"no keepalive acknowledged within the {self.ttl_s} s lease")
        return not self.lost.is_set()


class EtcdBackend(MetadataBackend):
    """The metadata backend of a cluster: ``EtcdBackend("10.0.0.1:2379,10.0.0.2:2379", cluster="prod")``.

    ``timeout_s`` bounds every etcd call; ``leader_ttl_s`` is the leader's lease
    (a dead leader is replaced after about that long).  With several endpoints,
    a call that finds its endpoint unreachable fails with UNAVAILABLE and the
    next call uses the next endpoint.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        cluster: str = "default",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        leader_ttl_s: int = DEFAULT_LEADER_TTL_S,
        root: str = DEFAULT_ROOT,
    ) -> None:
        if timeout_s <= 0:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"etcd timeout must be positive, got {timeout_s}")
        if leader_ttl_s < 1:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"leader TTL must be >= 1 s, got {leader_ttl_s}")
        self._endpoints = parse_endpoints(endpoints)
        self._endpoint_index = 0
        self.cluster = cluster
        self.prefix = cluster_prefix(cluster, root)
        self._timeout_s = float(timeout_s)
        self._leader_ttl_s = int(leader_ttl_s)
        self._k_namespaces = self.prefix + b"namespaces/"
        self._k_values = self.prefix + b"values/"
        self._k_config = self.prefix + b"config"
        self._k_nodes = self.prefix + b"nodes/"
        self._k_leader = self.prefix + b"election/leader"
        self._k_term = self.prefix + b"election/term"
        self._k_masters = self.prefix + b"masters/"
        self._client_obj: Any = None
        self._background: set[asyncio.Task[Any]] = set()
        self._kept: _KeptLease | None = None
        self._node_leases: dict[str, int] = {}
        self._closed = False

    # ------------------------------------------------------------------ plumbing
    @property
    def endpoint(self) -> str:
        host, port = self._endpoints[self._endpoint_index]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _client(self) -> Any:
        if self._closed:
            raise KVStoreError(ErrorCode.UNAVAILABLE, "the etcd metadata backend is closed")
        if self._client_obj is None:
            host, port = self._endpoints[self._endpoint_index]
            self._client_obj = aetcd.Client(
                host=f"[{host}]" if ":" in host else host,
                port=port,
                timeout=self._timeout_s,
                options=dict(_CHANNEL_OPTIONS),
            )
        return self._client_obj

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _endpoint_failed(self, client: Any) -> None:
        """Move to the next endpoint (only meaningful with several)."""
        if len(self._endpoints) > 1 and client is self._client_obj:
            failed = self.endpoint
            self._client_obj = None
            self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
            log.warning("etcd at %s unreachable; switching to endpoint %s", failed, self.endpoint)
            self._spawn(self._close_quietly(client))

    async def _close_quietly(self, client: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), self._timeout_s)

    async def _call(
        self,
        what: str,
        op: Callable[[Any], Awaitable[T]],
        timeout_s: float | None = None,
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Run ``op(client)`` under a deadline; unreachable/failed etcd -> KVStoreError(UNAVAILABLE)."""
        client = self._client()
        endpoint = self.endpoint  # the one this call uses: a failure below moves self.endpoint on
        try:
            return await asyncio.wait_for(op(client), timeout_s if timeout_s is not None else self._timeout_s)
        except passthrough:
            raise
        except TimeoutError as exc:
            self._endpoint_failed(client)
            raise KVStoreError(ErrorCode.UNAVAILABLE, f"etcd at {endpoint}: {what} timed out") from exc
        except aetcd.InvalidArgumentError as exc:
            raise KVStoreError(ErrorCode.INTERNAL, f"etcd rejected {what}: {exc}") from exc
        except (aetcd.ClientError, grpc.RpcError, OSError) as exc:
            if "lease not found" in str(exc):
                raise _LeaseNotFound(str(exc)) from exc
            if isinstance(
                exc, aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError | grpc.RpcError | OSError
            ):
                self._endpoint_failed(client)
            raise KVStoreError(ErrorCode.UNAVAILABLE, f"etcd at {endpoint}: {what} failed: {exc}") from exc

    async def _txn(
        self, what: str, compare: list[Any], success: list[Any], failure: list[Any]
    ) -> tuple[bool, list[Any]]:
        result = await self._call(
            what, lambda c: c.transaction(compare=compare, success=success, failure=failure)
        )
        return bool(result[0]), list(result[1])

    # ------------------------------------------------------------------ fencing
    def _fence_compare(self, client: Any, leadership: Leadership) -> Any:
        return client.transactions.create(self._k_leader) == leadership.token

    def _check_local(self, leadership: Leadership) -> None:
        """Fail fast (no I/O) when this process itself knows the leadership is over."""
        kept = self._kept
        owned = kept is not None and kept.leadership == leadership
        if owned and not self.leading(leadership):
            assert kept is not None
            raise KVStoreError(
                ErrorCode.NOT_LEADER, f"leadership of term {leadership.term} is over: {kept.reason}"
            )

    async def _not_leader(self, leadership: Leadership) -> KVStoreError:
        try:
            current = await self._current_leader()
            where = (
                f"; the leader is {current.leader_address} (term {current.term})"
                if current
                else "; no leader now"
            )
        except KVStoreError:
            where = ""  # the fence already answered; naming the successor is a courtesy
        kept = self._kept
        if kept is not None and kept.leadership == leadership:
            kept.lose("a fenced write found another leadership in etcd")
        return KVStoreError(ErrorCode.NOT_LEADER, f"leadership of term {leadership.term} is over{where}")

    async def _fenced(
        self, what: str, leadership: Leadership, compare: list[Any], success: list[Any], failure: list[Any]
    ) -> tuple[bool, list[Any]]:
        """A transaction that also requires ``leadership`` to be current; NOT_LEADER if it is not.

        The returned flag tells whether the caller's own comparisons held.
        """
        self._check_local(leadership)
        client = self._client()
        txn = client.transactions
        ok, responses = await self._txn(
            what,
            compare=[self._fence_compare(client, leadership)],
            success=[txn.txn(compare=compare, success=success, failure=failure)],
            failure=[],
        )
        if not ok:
            raise await self._not_leader(leadership)
        inner = responses[0].response_txn
        return bool(inner.succeeded), list(inner.responses)

    # ------------------------------------------------------------------ namespaces
    async def get_namespace(self, name: str) -> bytes | None:
        got = await self._call("get namespace", lambda c: c.get(self._k_namespaces + name.encode()))
        return bytes(got.value) if got is not None else None

    async def put_namespace_if_absent(
        self, name: str, spec: bytes, leadership: Leadership | None = None
    ) -> bytes | None:
        key = self._k_namespaces + name.encode()
        client = self._client()
        txn = client.transactions
        compare = [txn.create(key) == 0]
        success = [txn.put(key, bytes(spec))]
        failure = [txn.get(key)]
        if leadership is None:
            ok, responses = await self._txn("put namespace", compare, success, failure)
            if ok:
                return None
            values = [value for value, _meta in responses[0]]
        else:
            ok, raw = await self._fenced("put namespace", leadership, compare, success, failure)
            if ok:
                return None
            values = [kv.value for kv in raw[0].response_range.kvs]
        if not values:  # deleted between the compare and now: the put-if-absent lost to a delete; retry
            return await self.put_namespace_if_absent(name, spec, leadership)
        return bytes(values[0])

    async def delete_namespace(self, name: str, leadership: Leadership | None = None) -> bool:
        key = self._k_namespaces + name.encode()
        if leadership is None:
            deleted = await self._call("delete namespace", lambda c: c.delete(key))
            return deleted is not None
        txn = self._client().transactions
        _ok, raw = await self._fenced("delete namespace", leadership, [], [txn.delete(key)], [])
        return bool(raw[0].response_delete_range.deleted)

    async def list_namespaces(self) -> dict[str, bytes]:
        found = await self._call("list namespaces", lambda c: c.get_prefix(self._k_namespaces))
        start = len(self._k_namespaces)
        return {bytes(kv.key[start:]).decode(): bytes(kv.value) for kv in found.kvs}

    # ------------------------------------------------------------------ values and config
    async def get_or_create(self, key: str, value: bytes) -> bytes:
        full = self._k_values + key.encode()
        txn = self._client().transactions
        ok, responses = await self._txn(
            "get or create", [txn.create(full) == 0], [txn.put(full, bytes(value))], [txn.get(full)]
        )
        if ok:
            return bytes(value)
        values = [stored for stored, _meta in responses[0]]
        return bytes(values[0]) if values else await self.get_or_create(key, value)

    async def get_value(self, key: str) -> bytes | None:
        got = await self._call("get value", lambda c: c.get(self._k_values + key.encode()))
        return bytes(got.value) if got is not None else None

    async def put_if_leader(self, key: str, value: bytes, leadership: Leadership) -> None:
        txn = self._client().transactions
        await self._fenced(
            "fenced put", leadership, [], [txn.put(self._k_values + key.encode(), bytes(value))], []
        )

    async def get_cluster_config(self) -> bytes | None:
        got = await self._call("get cluster config", lambda c: c.get(self._k_config))
        return bytes(got.value) if got is not None else None

    async def put_cluster_config(self, blob: bytes, leadership: Leadership | None = None) -> None:
        if leadership is None:
            await self._call("put cluster config", lambda c: c.put(self._k_config, bytes(blob)))
            return
        txn = self._client().transactions
        await self._fenced("put cluster config", leadership, [], [txn.put(self._k_config, bytes(blob))], [])

    # ------------------------------------------------------------------ nodes
    async def _refresh(self, lease_id: int, timeout_s: float | None = None) -> int:
        """One keepalive; the lease's TTL in seconds, 0 if etcd no longer knows it."""
        reply = await self._call("lease keepalive", lambda c: c.refresh_lease(lease_id), timeout_s)
        return int(reply.TTL) if reply is not None else 0

    async def _revoke(self, lease_id: int) -> None:
        with contextlib.suppress(_LeaseNotFound):
            await self._call("revoke lease", lambda c: c.revoke_lease(lease_id))

    async def register_node(self, node_id: str, info: bytes, ttl_s: float) -> NodeRegistration:
        if not node_id:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "node id must not be empty")
        if ttl_s <= 0:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"node TTL must be positive, got {ttl_s}")
        ttl = max(1, math.ceil(ttl_s))  # etcd leases have whole seconds
        lease = await self._call("grant node lease", lambda c: c.lease(ttl))
        try:
            await self._call(
                "register node",
                lambda c: c.put(self._k_nodes + node_id.encode(), bytes(info), lease=lease.id),
            )
        except BaseException:
            self._spawn(self._revoke_quietly(lease.id))
            raise
        previous = self._node_leases.get(node_id)
        self._node_leases[node_id] = lease.id
        if previous is not None and previous != lease.id:
            self._spawn(self._revoke_quietly(previous))  # the key now lives under the new lease
        return NodeRegistration(node_id=node_id, lease_id=int(lease.id), ttl_s=float(ttl_s))

    async def _revoke_quietly(self, lease_id: int) -> None:
        with contextlib.suppress(KVStoreError):
            await self._revoke(lease_id)

    async def keepalive_node(self, registration: NodeRegistration) -> bool:
        return await self._refresh(registration.lease_id) > 0

    async def update_node(self, registration: NodeRegistration, info: bytes) -> bool:
        key = self._k_nodes + registration.node_id.encode()
        try:
            await self._call("update node", lambda c: c.put(key, bytes(info), lease=registration.lease_id))
        except _LeaseNotFound:
            return False
        return True

    async def unregister_node(self, registration: NodeRegistration) -> None:
        await self._revoke(registration.lease_id)
        if self._node_leases.get(registration.node_id) == registration.lease_id:
            del self._node_leases[registration.node_id]

    async def _nodes_with_revision(self) -> tuple[dict[str, bytes], int]:
        found = await self._call("list nodes", lambda c: c.get_prefix(self._k_nodes))
        start = len(self._k_nodes)
        nodes = {bytes(kv.key[start:]).decode(): bytes(kv.value) for kv in found.kvs}
        return nodes, int(found.header.revision)

    async def list_nodes(self) -> dict[str, bytes]:
        return (await self._nodes_with_revision())[0]

    async def _nodes_snapshot_retrying(self) -> tuple[dict[str, bytes], int]:
        delay = WATCH_BACKOFF_S[0]
        while True:
            try:
                return await self._nodes_with_revision()
            except KVStoreError as exc:
                if exc.code != ErrorCode.UNAVAILABLE or self._closed:
                    raise
                log.warning("node watch: cannot list nodes (%s); retrying in %.2f s", exc.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_BACKOFF_S[1])

    async def watch_nodes(self, include_existing: bool = True) -> AsyncGenerator[NodeEvent, None]:
        known, revision = await self._nodes_snapshot_retrying()
        if include_existing:
            for node_id, info in sorted(known.items()):
                yield NodeEvent(NODE_PUT, node_id, info)
        start = len(self._k_nodes)
        delay = WATCH_BACKOFF_S[0]
        while not self._closed:
            compacted = False
            watch: Any = None
            try:
                watch = await self._call(
                    "watch nodes",
                    functools.partial(_watch_prefix_from, prefix=self._k_nodes, revision=revision + 1),
                    passthrough=(aetcd.RevisionCompactedError,),
                )
            except aetcd.RevisionCompactedError:
                compacted = True
            except KVStoreError as exc:
                if exc.code != ErrorCode.UNAVAILABLE:
                    raise
                log.warning(
                    "node watch: %s; retrying from revision %d in %.2f s", exc.message, revision + 1, delay
                )
            if watch is not None:
                events = watch.__aiter__()
                try:
                    while True:
                        try:
                            event = await events.__anext__()
                        except StopAsyncIteration:
                            break
                        except aetcd.RevisionCompactedError:
                            compacted = True
                            break
                        except (aetcd.ClientError, grpc.RpcError, OSError) as exc:
                            log.warning(
                                "node watch interrupted (%s); resuming from revision %d", exc, revision + 1
                            )
                            break
                        delay = WATCH_BACKOFF_S[0]  # reset only by a watch that delivered something
                        node_id = bytes(event.kv.key[start:]).decode()
                        revision = max(revision, int(event.kv.mod_revision))
                        if event.kind == aetcd.EventKind.PUT:
                            known[node_id] = bytes(event.kv.value)
                            yield NodeEvent(NODE_PUT, node_id, known[node_id])
                        else:
                            known.pop(node_id, None)
                            yield NodeEvent(NODE_DELETE, node_id, b"")
                finally:
                    self._spawn(self._cancel_watch(watch))
            if compacted:
                # History we have not seen is gone: re-list and emit the difference.
                current, revision = await self._nodes_snapshot_retrying()
                log.info("node watch resynchronised at revision %d after a compaction", revision)
                yield NodeEvent(NODE_RESYNC, "", b"")
                for node_id in sorted(set(known) - set(current)):
                    yield NodeEvent(NODE_DELETE, node_id, b"")
                for node_id, info in sorted(current.items()):
                    if known.get(node_id) != info:
                        yield NodeEvent(NODE_PUT, node_id, info)
                known = current
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_BACKOFF_S[1])

    async def _cancel_watch(self, watch: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(watch.cancel(), self._timeout_s)

    # ------------------------------------------------------------------ leadership
    async def _grant_kept_lease(self) -> _KeptLease:
        sent = time.monotonic()
        lease = await self._call("grant leader lease", lambda c: c.lease(self._leader_ttl_s))
        kept = _KeptLease(int(lease.id), int(lease.ttl), sent)
        kept.task = asyncio.create_task(self._keep_alive(kept), name=f"etcd-lease-{kept.lease_id:x}")
        return kept

    async def _keep_alive(self, kept: _KeptLease) -> None:
        interval = kept.ttl_s / 3.0
        while kept.alive():
            sent = time.monotonic()
            try:
                ttl = await self._refresh(kept.lease_id, timeout_s=interval)
            except KVStoreError as exc:
                log.warning("lease %x keepalive failed: %s", kept.lease_id, exc.message)
            else:
                if ttl <= 0:
                    kept.lose("the lease expired or was revoked in etcd")
                    return
                kept.deadline = max(kept.deadline, sent + ttl * (1.0 - LEASE_SAFETY_MARGIN))
            pause = min(interval - (time.monotonic() - sent), kept.deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(kept.lost.wait(), max(0.01, pause))

    async def _current_leader(self) -> Leadership | None:
        got = await self._call("get leader", lambda c: c.get(self._k_leader))
        if got is None:
            return None
        return self._decode_leader(got.value, got.create_revision)

    @staticmethod
    def _decode_leader(value: bytes, create_revision: int) -> Leadership:
        record = json.loads(bytes(value))
        return Leadership(
            term=int(record["term"]), leader_address=str(record["address"]), token=int(create_revision)
        )

    async def _try_lead(self, address: str, kept: _KeptLease) -> Leadership | int | None:
        """One attempt: the Leadership if won, the revision to watch from if someone leads, None to retry now."""
        term_kv = await self._call("get term", lambda c: c.get(self._k_term))
        term = int(term_kv.value) if term_kv is not None else 0
        term_mod = int(term_kv.mod_revision) if term_kv is not None else 0
        record = json.dumps({"address": address, "term": term + 1}).encode()
        txn = self._client().transactions
        ok, responses = await self._txn(
            "take leadership",
            compare=[txn.create(self._k_leader) == 0, txn.mod(self._k_term) == term_mod],
            success=[
                txn.put(self._k_leader, record, lease=kept.lease_id),
                txn.put(self._k_term, str(term + 1).encode()),
            ],
            failure=[txn.get(self._k_leader)],
        )
        if ok:
            revision = int(responses[0].response_put.header.revision)
            return Leadership(term=term + 1, leader_address=address, token=revision)
        holders = responses[0]
        if not holders:
            return None  # the term moved but the seat is free: a leader came and went; try again
        value, meta = holders[0]
        if int(meta.lease) == kept.lease_id:
            # Our own earlier attempt won but its answer was lost (timeout): we lead.
            return self._decode_leader(value, meta.create_revision)
        return int(meta.header.revision)

    async def _wait_for_vacancy(self, revision: int, kept: _KeptLease) -> None:
        """Until the leader key changes after ``revision`` (or a re-check is due, or our lease died)."""
        recheck_s = float(self._leader_ttl_s)
        watched = asyncio.ensure_future(
            self._call(
                "watch leader",
                lambda c: c.watch_once(self._k_leader, timeout=recheck_s, start_revision=revision + 1),
                timeout_s=recheck_s + self._timeout_s,
                passthrough=(aetcd.WatchTimeoutError, aetcd.RevisionCompactedError),
            )
        )
        lost = asyncio.ensure_future(kept.lost.wait())
        try:
            await asyncio.wait({watched, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watched, lost):
                task.cancel()
            await asyncio.gather(watched, lost, return_exceptions=True)
        if watched.done() and not watched.cancelled():
            failure = watched.exception()
            if isinstance(failure, KVStoreError):
                raise failure

    async def campaign(self, address: str) -> Leadership:
        kept = self._kept
        if (
            kept is not None
            and kept.leadership is not None
            and kept.leadership.leader_address == address
            and kept.alive()
        ):
            return kept.leadership
        delay = WATCH_BACKOFF_S[0]
        while True:
            try:
                kept = self._kept
                if kept is None or not kept.alive():
                    if kept is not None and kept.task is not None:
                        kept.task.cancel()
                    kept = self._kept = await self._grant_kept_lease()
                candidate_key = self._k_masters + address.encode()
                if kept.candidate_key != candidate_key:
                    await self._call(
                        "list as candidate",
                        functools.partial(
                            _put_with_lease, key=candidate_key, value=b"", lease_id=kept.lease_id
                        ),
                    )
                    kept.candidate_key = candidate_key
                outcome = await self._try_lead(address, kept)
                if isinstance(outcome, Leadership):
                    kept.leadership = outcome
                    log.info("leading as %s with term %d", address, outcome.term)
                    return outcome
                if outcome is not None:
                    await self._wait_for_vacancy(outcome, kept)
                delay = WATCH_BACKOFF_S[0]
            except _LeaseNotFound:
                if self._kept is not None:
                    self._kept.lose("the candidate lease expired")
            except KVStoreError as exc:
                if exc.code != ErrorCode.UNAVAILABLE or self._closed:
                    raise
                log.warning("campaign of %s: %s; retrying in %.2f s", address, exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_BACKOFF_S[1])

    def leading(self, leadership: Leadership) -> bool:
        kept = self._kept
        return kept is not None and kept.leadership == leadership and kept.alive()

    async def still_leader(self, leadership: Leadership) -> bool:
        if not self.leading(leadership):
            return False
        try:
            current = await self._current_leader()
        except KVStoreError:
            # etcd is silent: the lease is still provably ours until its deadline.
            return self.leading(leadership)
        if current is None or current.token != leadership.token:
            kept = self._kept
            if kept is not None and kept.leadership == leadership:
                kept.lose("etcd names another leader")
            return False
        return self.leading(leadership)

    async def wait_lost(self, leadership: Leadership) -> str:
        kept = self._kept
        if kept is None or kept.leadership != leadership:
            return "this backend does not hold that leadership"
        while kept.alive():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(kept.lost.wait(), max(0.01, kept.deadline - time.monotonic()))
        return kept.reason

    async def resign(self) -> None:
        kept, self._kept = self._kept, None
        if kept is None:
            return
        kept.lose("resigned", expected=True)
        if kept.task is not None:
            kept.task.cancel()
        try:
            await self._revoke(kept.lease_id)
        except KVStoreError as exc:
            log.warning(
                "resign: could not revoke lease %x (%s); it lapses in %d s",
                kept.lease_id,
                exc.message,
                kept.ttl_s,
            )

    async def leader(self) -> str | None:
        current = await self._current_leader()
        return current.leader_address if current else None

    async def current_leadership(self) -> Leadership | None:
        return await self._current_leader()

    async def list_masters(self) -> list[str]:
        found = await self._call("list masters", lambda c: c.get_prefix(self._k_masters, keys_only=True))
        start = len(self._k_masters)
        return sorted(bytes(kv.key[start:]).decode() for kv in found.kvs)

    # ------------------------------------------------------------------ life cycle
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.lose("the metadata backend was closed", expected=True)
        if kept is not None and kept.task is not None:
            kept.task.cancel()
            with contextlib.suppress(BaseException):
                await kept.task
        client, self._client_obj = self._client_obj, None
        if client is not None:
            await self._close_quietly(client)
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
