"""Ordered, batched slot updates from the master to each node (Node.ApplySlotUpdates).

A node applies one SlotUpdates message as: assignments, then layer commits,
then frees.  To keep the order in which the master made its changes, a new
batch starts whenever an assignment or commit would follow a free in the
current one (a slot freed and assigned again in one batch would otherwise be
applied backwards).  Everything queued for a node goes out in one RPC per
batch, in order, under a per-node lock.  Assignments are flushed (and awaited)
before OpenPut answers; commits and frees go out from a background flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from kvstore._proto import kvstore_pb2 as pb

log = logging.getLogger("kvstore.master.notifier")

Sender = Callable[[int, pb.SlotUpdates], Awaitable[None]]
"""Sends one batch to a node (by registry index); raises on failure."""


@dataclass
class _Batch:
    namespaces: dict[str, int] = field(default_factory=dict)
    assign: list[tuple[np.ndarray, np.ndarray, bytes, bytes, np.ndarray, np.ndarray]] = field(
        default_factory=list
    )
    commit: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    free: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.assign or self.commit or self.free)

    def to_message(self, term: int) -> pb.SlotUpdates:
        names = sorted(self.namespaces, key=self.namespaces.__getitem__)
        msg = pb.SlotUpdates(term=term, namespaces=names)
        if self.assign:
            msg.assign_slots = np.concatenate([a[0] for a in self.assign]).astype("<u8").tobytes()
            msg.assign_generations = np.concatenate([a[1] for a in self.assign]).astype("<u4").tobytes()
            msg.assign_keys = b"".join(a[2] for a in self.assign)
            msg.assign_parents = b"".join(a[3] for a in self.assign)
            msg.assign_slot_bytes = np.concatenate([a[4] for a in self.assign]).astype("<u8").tobytes()
            msg.assign_ns_index = np.concatenate([a[5] for a in self.assign]).astype("<u2").tobytes()
        if self.commit:
            msg.commit_slots = np.concatenate([c[0] for c in self.commit]).astype("<u8").tobytes()
            msg.commit_layers = np.concatenate([c[1] for c in self.commit]).astype("<u2").tobytes()
            msg.commit_heads = np.concatenate([c[2] for c in self.commit]).astype("<u2").tobytes()
            msg.commit_checksums = np.concatenate([c[3] for c in self.commit]).astype("<u8").tobytes()
        if self.free:
            msg.free_slots = np.concatenate([f[0] for f in self.free]).astype("<u8").tobytes()
            msg.free_generations = np.concatenate([f[1] for f in self.free]).astype("<u4").tobytes()
        return msg


@dataclass
class _NodeQueue:
    batches: list[_Batch] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failing_since: float = 0.0  # first failure of the current run of failures (0: healthy)

    def tail(self, after_free: bool) -> _Batch:
        """The batch to append to; a fresh one if the record must not be reordered before queued frees."""
        if not self.batches or (after_free and self.batches[-1].free):
            self.batches.append(_Batch())
        return self.batches[-1]


class Notifier:
    """Per-node ordered queues of SlotUpdates."""

    def __init__(
        self,
        send: Sender,
        term: Callable[[], int],
        on_failure: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.time,
        flush_interval_s: float = 0.005,
    ) -> None:
        self._send = send
        self._term = term
        self._on_failure = on_failure
        self._clock = clock
        self._interval = flush_interval_s
        self._queues: dict[int, _NodeQueue] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- queueing (synchronous: called from the master's logic)
    def enqueue_assign(
        self,
        node: int,
        namespace: str,
        slots: np.ndarray,
        generations: np.ndarray,
        keys: bytes,
        parents: bytes,
        slot_bytes: int,
    ) -> None:
        if not len(slots):
            return
        batch = self._queue(node).tail(after_free=True)
        ns_index = batch.namespaces.setdefault(namespace, len(batch.namespaces))
        count = len(slots)
        batch.assign.append(
            (
                np.asarray(slots, dtype=np.uint64),
                np.asarray(generations, dtype=np.uint32),
                keys,
                parents,
                np.full(count, slot_bytes, dtype=np.uint64),
                np.full(count, ns_index, dtype=np.uint16),
            )
        )
        self._wake.set()

    def enqueue_commit(
        self, node: int, slots: np.ndarray, layers: np.ndarray, heads: tuple[int, int], checksums: np.ndarray
    ) -> None:
        """One record per (slot, layer): ``slots`` and ``layers`` are parallel arrays."""
        if not len(slots):
            return
        batch = self._queue(node).tail(after_free=True)
        head_pairs = np.empty((len(slots), 2), dtype=np.uint16)
        head_pairs[:, 0], head_pairs[:, 1] = heads
        batch.commit.append(
            (
                np.asarray(slots, dtype=np.uint64),
                np.asarray(layers, dtype=np.uint16),
                head_pairs.reshape(-1),
                np.asarray(checksums, dtype=np.uint64),
            )
        )
        self._wake.set()

    def enqueue_free(self, node: int, slots: np.ndarray, generations: np.ndarray) -> None:
        if not len(slots):
            return
        batch = self._queue(node).tail(after_free=False)
        batch.free.append((np.asarray(slots, dtype=np.uint64), np.asarray(generations, dtype=np.uint32)))
        self._wake.set()

    def drop(self, node: int) -> None:
        """Forget a node's queue (it is gone; its slots went with it)."""
        self._queues.pop(node, None)

    def failing(self, node: int) -> bool:
        """Whether the last attempt to reach ``node`` failed (placement avoids it meanwhile)."""
        queue = self._queues.get(node)
        return queue is not None and bool(queue.failing_since)

    def pending(self, node: int) -> int:
        queue = self._queues.get(node)
        return 0 if queue is None else sum(not b.empty() for b in queue.batches)

    # -- sending
    async def flush(self, node: int) -> bool:
        """Send everything queued for ``node``, in order; False if the node could not be reached."""
        queue = self._queues.get(node)
        if queue is None:
            return True
        async with queue.lock:
            # Take what is queued now; records enqueued while an RPC is in flight start a new list.
            batches, queue.batches = [b for b in queue.batches if not b.empty()], []
            for i, batch in enumerate(batches):
                try:
                    await self._send(node, batch.to_message(self._term()))
                except Exception as exc:  # noqa: BLE001 - any transport failure: keep the batches, report
                    if self._queues.get(node) is not queue:
                        return False  # the node was dropped meanwhile
                    queue.batches = batches[i:] + queue.batches
                    if not queue.failing_since:
                        queue.failing_since = self._clock()
                    log.warning("slot updates to node %d failed: %s", node, exc)
                    if self._on_failure is not None:
                        self._on_failure(node, queue.failing_since)
                    return False
            queue.failing_since = 0.0
            return True

    async def announce_term(self, node: int) -> bool:
        """Send ``node`` an empty batch carrying the current term (a new leader fencing its predecessor).

        In order with everything else queued for the node; False if it could not be reached.
        """
        queue = self._queue(node)
        async with queue.lock:
            try:
                await self._send(node, _Batch().to_message(self._term()))
            except Exception as exc:  # noqa: BLE001 - any transport failure
                log.warning("term announcement to node %d failed: %s", node, exc)
                return False
        return True

    async def flush_all(self) -> None:
        nodes = [n for n, q in self._queues.items() if any(not b.empty() for b in q.batches)]
        if nodes:
            await asyncio.gather(*(self.flush(n) for n in nodes))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvstore-notifier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._interval)  # gather a few records into one RPC
            try:
                await self.flush_all()
            except Exception:  # noqa: BLE001 - the flusher must survive anything
                log.exception("background flush failed")
            if any(q.failing_since for q in self._queues.values()):
                await asyncio.sleep(max(self._interval, 0.1))  # retry failing nodes, but not in a hot loop
                self._wake.set()

    def _queue(self, node: int) -> _NodeQueue:
        queue = self._queues.get(node)
        if queue is None:
            queue = self._queues[node] = _NodeQueue()
        return queue
