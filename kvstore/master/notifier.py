"""Ordered, batched slot updates from the master to each node (Node.ApplySlotUpdates).

A node applies one SlotUpdates message as: assignments, then layer commits,
then frees.  To keep the order in which the master made its changes, a new
batch starts whenever an assignment or commit would follow a free in the
current one (a slot freed and assigned again in one batch would otherwise be
applied backwards).  Everything queued for a node goes out as one message per
batch, in order, written under a per-node lock; answers are awaited outside it
(they come back in order), so a flush someone waits for is written behind the
batches in flight at once.  Assignments are flushed (and awaited) before OpenPut
answers, a durable commit's records before it answers; deferred commits and
frees go out once the batch in flight is answered, merged with what queued meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from kvstore._proto import kvstore_pb2 as pb

log = logging.getLogger("kvstore.master.notifier")

Sender = Callable[[int, pb.SlotUpdates], Awaitable[None]]
"""Sends one batch to a node (by registry index); raises on failure."""
Poster = Callable[[int, pb.SlotUpdates], Awaitable[Awaitable[None]]]
"""Puts one batch on its way to a node and returns its answer to await (which raises on failure).

Batches are written in call order and answered in that order; a batch is
written without waiting for the answers to those before it (NodeRegistry.post_updates).
"""


def answered() -> asyncio.Future[None]:
    """A Poster's answer that is already there (a batch sent by a whole round trip, or to nobody)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


@dataclass
class _Batch:
    namespaces: dict[str, int] = field(default_factory=dict)
    assign: list[tuple[np.ndarray, np.ndarray, bytes, bytes, np.ndarray, np.ndarray]] = field(
        default_factory=list
    )
    commit: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    free: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    seq: int = -1  # order among the batches taken for sending (-1: not taken yet)

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
    # written to the node, not answered yet, in order (a failure puts them back in front of ``batches``)
    in_flight: list[_Batch] = field(default_factory=list)
    last_answer: asyncio.Future[None] | None = None  # the answer of the batch written last
    failures: int = 0  # failed batches so far: a flush that saw one meanwhile reports False
    taken: int = 0  # batches taken for sending so far (their ``seq``)
    # commit records enqueued since batches were last taken (a hint: batches put back after a failure
    # are not counted, and go out with the background flush that retries them)
    queued_records: int = 0

    def put_back(self, failed: list[_Batch]) -> None:
        """Failed batches go back in front, in the order they were taken (failures land in any order)."""
        retry = sorted(failed + [b for b in self.batches if b.seq >= 0], key=lambda b: b.seq)
        self.batches = retry + [b for b in self.batches if b.seq < 0]

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
        post: Poster | None = None,
    ) -> None:
        self._send = send
        self._post = post or self._send_and_wait
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
        queue = self._queue(node)
        queue.queued_records += len(slots)
        batch = queue.tail(after_free=True)
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

    def queued_records(self, node: int) -> int:
        """Layer commit records enqueued for ``node`` since its batches were last taken for sending."""
        queue = self._queues.get(node)
        return 0 if queue is None else queue.queued_records

    def pending(self, node: int) -> int:
        queue = self._queues.get(node)
        return 0 if queue is None else sum(not b.empty() for b in queue.batches)

    # -- sending
    async def _send_and_wait(self, node: int, msg: pb.SlotUpdates) -> Awaitable[None]:
        """A Poster from a plain Sender: the whole round trip, then an answer already there."""
        await self._send(node, msg)
        return answered()

    async def flush(self, node: int, urgent: bool = True) -> bool:
        """Send everything queued for ``node``, in order; False if the node could not be reached.

        Returns once the node answered every batch queued before the call, those
        written by an earlier flush included.  The batches are written under the
        queue's lock and their answers awaited outside it, so an ``urgent`` flush
        (someone waits for it: a durable commit, an OpenPut) is written behind the
        batches in flight at once, not after their round trips.  Other flushes
        (deferred commits, the background flush) first wait for the answer in
        flight, so what is queued meanwhile goes out as one batch, as it did when
        the node had one batch at a time.
        """
        queue = self._queues.get(node)
        if queue is None:
            return True
        # Until no batch is in flight: another flush may have written one while this one waited.
        # One such batch at a time, so the records queued behind it go out merged (a node's
        # message costs it ~0.4 ms of gRPC beyond the apply: a durable commit written behind
        # five small batches waited out five of those).
        while not urgent and queue.last_answer is not None and not queue.last_answer.done():
            with contextlib.suppress(Exception):  # reported by _answered
                await asyncio.shield(queue.last_answer)
        posted: list[asyncio.Future[None]] = []
        async with queue.lock:
            failures = queue.failures
            # Take what is queued now; records enqueued while a batch is being written start a new list.
            batches, queue.batches = [b for b in queue.batches if not b.empty()], []
            queue.queued_records = 0
            for batch in batches:
                if batch.seq < 0:
                    batch.seq, queue.taken = queue.taken, queue.taken + 1
            for i, batch in enumerate(batches):
                try:
                    answer = asyncio.ensure_future(await self._post(node, batch.to_message(self._term())))
                except Exception as exc:  # noqa: BLE001 - any transport failure: keep the batches, report
                    if self._queues.get(node) is queue:  # else the node was dropped meanwhile
                        queue.put_back(batches[i:])
                        self._failed(node, queue, exc)
                    return False
                queue.in_flight.append(batch)
                answer.add_done_callback(functools.partial(self._answered, node, queue, batch))
                posted.append(answer)
            # nothing new: wait for the batches on their way (they may carry this caller's records)
            waits: list[asyncio.Future[None]] = posted or (
                [queue.last_answer] if queue.last_answer is not None else []
            )
            if posted:
                queue.last_answer = posted[-1]
        for waited in waits:
            with contextlib.suppress(Exception):  # reported by _answered
                await asyncio.shield(waited)
        if queue.failures != failures or self._queues.get(node) is not queue:
            return False
        if posted:
            queue.failing_since = 0.0
        return True

    def _answered(self, node: int, queue: _NodeQueue, batch: _Batch, answer: asyncio.Future[None]) -> None:
        """A written batch's answer: done, or it goes back in front of the queue with those after it."""
        exc = BaseException("cancelled") if answer.cancelled() else answer.exception()
        if batch not in queue.in_flight:
            return  # put back already by an earlier batch's failure
        at = queue.in_flight.index(batch)
        if exc is None:
            del queue.in_flight[at]
            return
        failed, queue.in_flight = queue.in_flight[at:], queue.in_flight[:at]
        if self._queues.get(node) is queue:
            queue.put_back(failed)  # those written after it may or may not have been applied: again
            self._failed(node, queue, exc)

    def _failed(self, node: int, queue: _NodeQueue, exc: BaseException) -> None:
        queue.failures += 1
        if not queue.failing_since:
            queue.failing_since = self._clock()
        log.warning("slot updates to node %d failed: %s", node, exc)
        if self._on_failure is not None:
            self._on_failure(node, queue.failing_since)

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

    async def flush_all(self, urgent: bool = True) -> None:
        nodes = [n for n, q in self._queues.items() if any(not b.empty() for b in q.batches)]
        if nodes:
            await asyncio.gather(*(self.flush(n, urgent) for n in nodes))

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
                await self.flush_all(urgent=False)
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
