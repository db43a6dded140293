"""Layer streaming on the master (issue 5, "Layer streaming"; DESIGN.md, "Get").

A decoder calls ``StreamPrefix`` while a prefill is still writing.  The master
takes ONE read lease on the leading pages of the chain that are complete or
being written by a live put session (their slots were allocated at OpenPut and
never move while leased), sends their placements once, then one message per
commit step: for each wanted layer, how many leading pages have that layer
fully committed (every head).  The client reads a layer as soon as its count
reaches the stream's page count.

Bookkeeping is per stream, woken by hooks the master core calls from its
commit, OpenPut and free paths (``asyncio.Event``; no polling).  A commit wakes
only the streams of its namespace whose pages it touched, and each woken stream
recomputes its progress with a few numpy passes over its own pages.

Pages whose writer goes away (abort, expired session) while a stream's lease
holds them are not freed: :meth:`Master._doom_leased` marks them DOOMED
(unmatchable, their key forgotten so a new writer starts afresh) and the lease's
end frees them.  The stream then shrinks its page count to the first such page
that lacks a wanted layer: the client learns those pages will never be ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvstore import grants, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.master.index import COMPLETE, DOOMED, PENDING, ROOT

if TYPE_CHECKING:
    from kvstore.master.core import Master, Namespace

log = logging.getLogger("kvstore.master.streams")

KEY = keys.KEY_BYTES


@dataclass(eq=False)
class PrefixStream:
    """One StreamPrefix call: its lease, its pages and what it has told the client."""

    ns_id: int
    lease_id: str
    rows: np.ndarray  # i64 leased rows, page order
    epochs: np.ndarray  # u32 epochs of the rows when leased
    layers: np.ndarray  # i64 wanted layers (namespace numbering)
    expires: float
    num_pages: int  # pages every wanted layer can still get; only shrinks
    sent: np.ndarray = field(init=False)  # i64 pages_ready told the client, per wanted layer
    sorted_rows: np.ndarray = field(init=False)  # for cheap "did this commit touch me"
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closing: KVStoreError | None = None  # set when the master stops: ends the stream with this status
    released: bool = False  # its lease was released by someone (ReleaseLease)

    def __post_init__(self) -> None:
        self.sent = np.zeros(len(self.layers), dtype=np.int64)
        self.sorted_rows = np.sort(self.rows)

    def touches(self, rows: np.ndarray) -> bool:
        if not len(rows) or not len(self.sorted_rows):
            return False
        pos = np.searchsorted(self.sorted_rows, rows)
        pos = np.minimum(pos, len(self.sorted_rows) - 1)
        return bool(np.any(self.sorted_rows[pos] == rows))


class StreamTable:
    """Every open stream of a master, and the hooks that wake them."""

    def __init__(self, master: Master) -> None:
        self._master = master
        self._by_ns: dict[int, set[PrefixStream]] = {}
        self._by_lease: dict[str, PrefixStream] = {}
        # namespace id -> event set (and dropped) by the next OpenPut that inserts pages there
        self._arrivals: dict[int, asyncio.Event] = {}
        self._closing: KVStoreError | None = None

    def __len__(self) -> int:
        return len(self._by_lease)

    # ------------------------------------------------------------------ hooks (called by Master)
    def pages_added(self, ns_id: int) -> None:
        """OpenPut inserted pages into the namespace: streams waiting for their page 0 look again."""
        event = self._arrivals.pop(ns_id, None)
        if event is not None:
            event.set()

    def rows_changed(self, ns_id: int, rows: np.ndarray) -> None:
        """Layers of ``rows`` were committed, or ``rows`` are being freed or doomed: wake their streams."""
        streams = self._by_ns.get(ns_id)
        if not streams:
            return
        for stream in streams:
            if not stream.wake.is_set() and stream.touches(rows):
                stream.wake.set()

    def rows_freed(self, rows: np.ndarray) -> None:
        """Rows (of any namespaces) are about to be freed."""
        if not self._by_ns or not len(rows):
            return
        ns_of = self._master.index.ns[rows]
        for ns_id in np.unique(ns_of).tolist():
            if ns_id in self._by_ns:
                self.rows_changed(ns_id, rows[ns_of == ns_id])

    def lease_released(self, lease_id: str) -> None:
        stream = self._by_lease.get(lease_id)
        if stream is not None:
            stream.released = True
            stream.wake.set()

    def close(self, error: KVStoreError) -> None:
        """The master stops leading: every stream ends with ``error``."""
        self._closing = error
        for stream in list(self._by_lease.values()):
            stream.closing = error
            stream.wake.set()
        for event in self._arrivals.values():
            event.set()
        self._arrivals.clear()

    # ------------------------------------------------------------------ the stream
    def _streamable(self, ns: Namespace, packed_keys: bytes) -> tuple[np.ndarray, int]:
        """Rows of the keys and how many lead the chain: complete, or pending with a live writer."""
        master, index = self._master, self._master.index
        rows = index.lookup(ns.ns_id, packed_keys)
        if not len(rows):
            return rows, 0
        safe = np.where(rows >= 0, rows, 0)
        expected_parent = np.empty(len(rows), dtype=np.int64)
        expected_parent[0] = ROOT
        expected_parent[1:] = rows[:-1]
        state = index.state[safe]
        writing = np.zeros(len(rows), dtype=bool)
        pending = np.flatnonzero((rows >= 0) & (state == PENDING) & (index.pend[safe] >= 0))
        table = index.pending.get(ns.ns_id)
        if len(pending) and table is not None:
            writing[pending] = table.writers[index.pend[safe[pending]]] > 0
        ok = (
            (rows >= 0)
            & ((state == COMPLETE) | writing)
            & master.nodes.alive[index.node[safe]]
            & (index.parent[safe] == expected_parent)
        )
        count = len(rows) if ok.all() else int(np.argmin(ok))
        index.last_access[rows[:count]] = master.clock()
        return rows, count

    def _progress(self, stream: PrefixStream) -> tuple[int, np.ndarray]:
        """(pages every wanted layer can still get, leading pages fully committed per wanted layer)."""
        index = self._master.index
        n = stream.num_pages
        rows, epochs = stream.rows[:n], stream.epochs[:n]
        if n == 0:
            return 0, np.zeros(len(stream.layers), dtype=np.int64)
        valid = index.valid(rows, epochs)
        pend = index.pend[rows]
        full = np.repeat(valid[:, None], len(stream.layers), axis=1)
        partial = np.flatnonzero(valid & (pend >= 0))
        table = index.pending.get(stream.ns_id)
        if len(partial):
            if table is None:
                full[partial] = False
            else:
                coverage = table.coverage[pend[partial][:, None], stream.layers[None, :], :]
                full[partial] = coverage.all(axis=2)
        # a page is lost for good when it is gone, or doomed (no writer left) without every wanted layer
        lost = ~valid | ((index.state[rows] == DOOMED) & ~full.all(axis=1))
        if lost.any():
            n = int(np.argmax(lost))
        full = full[:n]
        if n == 0:
            return 0, np.zeros(len(stream.layers), dtype=np.int64)
        ready = np.where(full.all(axis=0), n, np.argmin(full, axis=0)).astype(np.int64)
        return n, ready

    def _update(self, stream: PrefixStream, first: bool = False) -> pb.StreamPrefixUpdate | None:
        """The message telling what moved since the last one (None: nothing did)."""
        num, ready = self._progress(stream)
        moved = np.flatnonzero(ready > stream.sent)
        shrank = num < stream.num_pages
        stream.num_pages = num
        stream.sent = np.maximum(stream.sent, ready)
        if not first and not shrank and not len(moved):
            return None
        return pb.StreamPrefixUpdate(
            num_pages=num,
            layers_ready=stream.layers[moved].astype("<u2").tobytes(),
            pages_ready=stream.sent[moved].astype("<u4").tobytes(),
            done=bool(np.all(stream.sent >= num)),
        )

    async def stream(
        self,
        namespace: str,
        packed_keys: bytes,
        layers: np.ndarray,
        lease_ms: int = 0,
        client_host: str = "",
        wait_ms: int = 0,
    ) -> AsyncIterator[pb.StreamPrefixUpdate]:
        """The messages of one StreamPrefix call; raises KVStoreError for a request it cannot serve."""
        master = self._master
        ns = await master.namespace(namespace)
        num_layers = ns.layout.num_layers
        if len(layers):
            wanted = np.asarray(layers, dtype=np.int64)
            bad = wanted[wanted >= num_layers]
            if len(bad):
                raise KVStoreError(ErrorCode.BAD_RANGE, f"layer {int(bad[0])} outside [0, {num_layers})")
            if len(np.unique(wanted)) != len(wanted):
                raise KVStoreError(ErrorCode.BAD_RANGE, "layers repeat")
        else:
            wanted = np.arange(num_layers, dtype=np.int64)
        if (
            len(packed_keys) // KEY
            and len(np.unique(np.frombuffer(packed_keys, dtype=f"V{KEY}"))) != len(packed_keys) // KEY
        ):
            raise KVStoreError(ErrorCode.BAD_KEYS, "duplicate page keys in one request")
        lease_s = master._lease_s(lease_ms, master.cfg.read_lease_ms)
        loop = asyncio.get_running_loop()
        wait_until = loop.time() + min(wait_ms, master.cfg.max_lease_ms) / 1000.0  # asyncio's clock: it waits
        while True:
            if self._closing is not None:
                raise self._closing
            master.check_leading()
            expires = master.clock() + lease_s
            # Cover the lease before matching: nothing may run between the match and the lease.
            await master._cover_lease(expires)
            rows, count = self._streamable(ns, packed_keys)
            left = wait_until - loop.time()
            if count or left <= 0 or ns.deleted:
                break
            arrival = self._arrivals.setdefault(ns.ns_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrival.wait(), left)
        if count and master.tiering.needs_promotion(rows[:count]):
            # tiers: NVMe pages are never handed out; promote them to DRAM, match again, and
            # end the prefix at any page still on NVMe (the lease is created right after)
            await master.tiering.promote_for_read(rows[:count])
            master.check_leading()
            rows, count = self._streamable(ns, packed_keys)
            count = master.tiering.readable_prefix(rows, count)
        if count == 0:
            yield pb.StreamPrefixUpdate(num_pages=0, done=True)
            return

        lease = master.leases.create(ns.ns_id, ns.name, rows[:count], packed_keys[: count * KEY], expires)
        stream = PrefixStream(
            ns_id=ns.ns_id,
            lease_id=lease.lease_id,
            rows=lease.rows,
            epochs=lease.epochs,
            layers=wanted,
            expires=expires,
            num_pages=count,
        )
        self._by_lease[lease.lease_id] = stream
        self._by_ns.setdefault(ns.ns_id, set()).add(stream)
        finished = False
        try:
            first = self._update(stream, first=True)
            assert first is not None
            first.lease_id = lease.lease_id
            first.expires_unix_ms = int(expires * 1000)
            first.placements.CopyFrom(
                master._placements(stream.rows, ns.layout.slot_bytes, grants.READ, expires)
            )
            log.debug("stream %s: %d pages leased, %d layers wanted", lease.lease_id[:8], count, len(wanted))
            update: pb.StreamPrefixUpdate | None = first
            while True:
                # Cleared before the progress is computed: a hook that fires while the message is
                # being sent wakes the next round.
                stream.wake.clear()
                if update is not None:
                    if update.done:
                        finished = True  # the client reads the last layers, then releases the lease
                    yield update
                    if finished:
                        return
                left = stream.expires - master.clock()
                if stream.closing is not None:
                    raise stream.closing
                if stream.released or left <= 0 or master.leases.get(lease.lease_id, master.clock()) is None:
                    finished = True  # nothing to release
                    raise KVStoreError(
                        ErrorCode.LEASE_NOT_FOUND,
                        f"the stream's read lease ended with {int(np.count_nonzero(stream.sent < stream.num_pages))} "
                        "wanted layer(s) not committed yet",
                    )
                if not master.leading():
                    raise KVStoreError(ErrorCode.NOT_LEADER, "this master's leadership ended")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.wake.wait(), left)
                update = self._update(stream)
        finally:
            self._by_lease.pop(lease.lease_id, None)
            peers = self._by_ns.get(ns.ns_id)
            if peers is not None:
                peers.discard(stream)
                if not peers:
                    del self._by_ns[ns.ns_id]
            if not finished and master.leading():
                # cancelled by the client or ended by an error: its lease goes with it
                master.release_lease(lease.lease_id)
