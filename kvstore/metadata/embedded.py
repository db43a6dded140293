"""In-process metadata backend for a single machine: no durability beyond the master process.

The master that holds it is normally the only master, so its first campaign
leads at once with term 1.  Several candidates in one process still get etcd's
semantics (one leader, the others wait, the term grows on every change), which
keeps code written against the interface honest when it runs embedded.

Node registrations expire by an injectable clock (``clock``, seconds, default
``time.monotonic``); expiry is checked on every call and, for watchers, every
``sweep_interval_s`` of real time, so tests can move a fake clock and observe
expiries without sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, Callable

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.metadata.base import (
    NODE_DELETE,
    NODE_PUT,
    Leadership,
    MetadataBackend,
    NodeEvent,
    NodeRegistration,
)


class _Registration:
    __slots__ = ("lease_id", "info", "ttl_s", "expires_at")

    def __init__(self, lease_id: int, info: bytes, ttl_s: float, expires_at: float) -> None:
        self.lease_id = lease_id
        self.info = info
        self.ttl_s = ttl_s
        self.expires_at = expires_at


class EmbeddedBackend(MetadataBackend):
    def __init__(self, clock: Callable[[], float] | None = None, sweep_interval_s: float = 0.25) -> None:
        import time

        self._clock = clock or time.monotonic
        self._sweep_interval_s = sweep_interval_s
        self._namespaces: dict[str, bytes] = {}
        self._values: dict[str, bytes] = {}
        self._config: bytes | None = None
        self._nodes: dict[str, _Registration] = {}
        self._lease_ids = itertools.count(1)
        self._watchers: set[asyncio.Queue[NodeEvent]] = set()
        self._term = 0
        self._leadership: Leadership | None = None
        self._lost_reason = ""
        self._candidates: list[str] = []
        self._changed = asyncio.Condition()
        self._closed = False

    # -- namespaces
    async def get_namespace(self, name: str) -> bytes | None:
        return self._namespaces.get(name)

    async def put_namespace_if_absent(
        self, name: str, spec: bytes, leadership: Leadership | None = None
    ) -> bytes | None:
        self._fence(leadership)
        existing = self._namespaces.get(name)
        if existing is None:
            self._namespaces[name] = spec
        return existing

    async def delete_namespace(self, name: str, leadership: Leadership | None = None) -> bool:
        self._fence(leadership)
        return self._namespaces.pop(name, None) is not None

    async def list_namespaces(self) -> dict[str, bytes]:
        return dict(self._namespaces)

    # -- values and config
    async def get_or_create(self, key: str, value: bytes) -> bytes:
        return self._values.setdefault(key, value)

    async def get_value(self, key: str) -> bytes | None:
        return self._values.get(key)

    async def put_if_leader(self, key: str, value: bytes, leadership: Leadership) -> None:
        self._fence(leadership)
        self._values[key] = value

    async def get_cluster_config(self) -> bytes | None:
        return self._config

    async def put_cluster_config(self, blob: bytes, leadership: Leadership | None = None) -> None:
        self._fence(leadership)
        self._config = bytes(blob)

    # -- nodes
    def _expire(self) -> None:
        now = self._clock()
        dead = [node_id for node_id, reg in self._nodes.items() if reg.expires_at <= now]
        for node_id in dead:
            del self._nodes[node_id]
            self._publish(NodeEvent(NODE_DELETE, node_id, b""))

    def _publish(self, event: NodeEvent) -> None:
        for queue in self._watchers:
            queue.put_nowait(event)

    def _live(self, registration: NodeRegistration) -> _Registration | None:
        self._expire()
        current = self._nodes.get(registration.node_id)
        if current is None or current.lease_id != registration.lease_id:
            return None
        return current

    async def register_node(self, node_id: str, info: bytes, ttl_s: float) -> NodeRegistration:
        if not node_id:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "node id must not be empty")
        if ttl_s <= 0:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"node TTL must be positive, got {ttl_s}")
        self._expire()
        lease_id = next(self._lease_ids)
        self._nodes[node_id] = _Registration(lease_id, bytes(info), ttl_s, self._clock() + ttl_s)
        self._publish(NodeEvent(NODE_PUT, node_id, bytes(info)))
        return NodeRegistration(node_id=node_id, lease_id=lease_id, ttl_s=ttl_s)

    async def keepalive_node(self, registration: NodeRegistration) -> bool:
        current = self._live(registration)
        if current is None:
            return False
        current.expires_at = self._clock() + current.ttl_s
        return True

    async def update_node(self, registration: NodeRegistration, info: bytes) -> bool:
        current = self._live(registration)
        if current is None:
            return False
        current.info = bytes(info)
        self._publish(NodeEvent(NODE_PUT, registration.node_id, current.info))
        return True

    async def unregister_node(self, registration: NodeRegistration) -> None:
        if self._live(registration) is not None:
            del self._nodes[registration.node_id]
            self._publish(NodeEvent(NODE_DELETE, registration.node_id, b""))

    async def list_nodes(self) -> dict[str, bytes]:
        self._expire()
        return {node_id: reg.info for node_id, reg in self._nodes.items()}

    async def watch_nodes(self, include_existing: bool = True) -> AsyncGenerator[NodeEvent, None]:
        queue: asyncio.Queue[NodeEvent] = asyncio.Queue()
        self._expire()
        if include_existing:
            for node_id, reg in self._nodes.items():
                queue.put_nowait(NodeEvent(NODE_PUT, node_id, reg.info))
        self._watchers.add(queue)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), self._sweep_interval_s)
                except TimeoutError:
                    self._expire()
                    continue
                yield event
        finally:
            self._watchers.discard(queue)

    # -- leadership
    def _fence(self, leadership: Leadership | None) -> None:
        if leadership is not None and leadership != self._leadership:
            current = self._leadership
            where = f"; the leader is {current.leader_address} (term {current.term})" if current else ""
            raise KVStoreError(ErrorCode.NOT_LEADER, f"leadership of term {leadership.term} is over{where}")

    async def campaign(self, address: str) -> Leadership:
        async with self._changed:
            self._candidates.append(address)
            try:
                await self._changed.wait_for(lambda: self._leadership is None or self._closed)
                if self._closed:
                    raise KVStoreError(ErrorCode.UNAVAILABLE, "metadata backend closed")
                self._term += 1
                self._leadership = Leadership(term=self._term, leader_address=address, token=self._term)
                self._changed.notify_all()
                return self._leadership
            finally:
                self._candidates.remove(address)

    def leading(self, leadership: Leadership) -> bool:
        return leadership == self._leadership

    async def still_leader(self, leadership: Leadership) -> bool:
        return self.leading(leadership)

    async def wait_lost(self, leadership: Leadership) -> str:
        async with self._changed:
            await self._changed.wait_for(lambda: self._leadership != leadership)
        return self._lost_reason or "resigned"

    async def resign(self) -> None:
        async with self._changed:
            if self._leadership is not None:
                self._leadership = None
                self._lost_reason = "resigned"
                self._changed.notify_all()

    async def leader(self) -> str | None:
        return self._leadership.leader_address if self._leadership else None

    async def current_leadership(self) -> Leadership | None:
        return self._leadership

    async def list_masters(self) -> list[str]:
        masters = set(self._candidates)
        if self._leadership is not None:
            masters.add(self._leadership.leader_address)
        return sorted(masters)

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()
