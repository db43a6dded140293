"""The master's state and logic, free of gRPC so it can be tested directly.

:class:`Master` ties the parts together: namespaces (cached, stored through the
metadata backend), the page index, one allocator per node region, put sessions,
read leases, eviction, extras and the ordered slot-update queues to the nodes.
Every method runs on the event loop and never blocks; the only awaits are the
metadata backend, node RPCs and the assignment flush before OpenPut answers.
Bulk work is vectorised over index columns, and the background sweep touches
only what is due (heaps) or a bounded batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore import grants, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.config import Config
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.layout import Layout
from kvstore.master.allocator import RegionAllocator
from kvstore.master.eviction import EvictionPolicy, LruLeavesFirst
from kvstore.master.extras import ExtrasStore
from kvstore.master.index import COMPLETE, DOOMED, FREE, ORPHAN, PENDING, ROOT, PageIndex
from kvstore.master.leases import LeaseTable, ReadLease
from kvstore.master.nodes import NO_NODE, TIER_CODE, TIERS, NodeRecord, NodeRegistry
from kvstore.master.notifier import Notifier, Sender
from kvstore.master.placement import HostThenMostFree, NodeCandidate, PlacementStrategy
from kvstore.master.rebuild import InventoryTable, complete_pages, first_of_each_key, parse_inventory
from kvstore.master.sessions import PutSession, SessionTable
from kvstore.master.streams import StreamTable
from kvstore.master.tiering import Tiering
from kvstore.metadata.base import NODE_DELETE, NODE_PUT, Leadership, MetadataBackend

log = logging.getLogger("kvstore.master")

KEY = keys.KEY_BYTES
MAX_BLOB_FIELD = 1024  # fingerprint / salt bytes
MAX_NAMESPACES = 1 << 16
SWEEP_INTERVAL_S = 0.1
NODE_RPC_TIMEOUT_S = 5.0
INVENTORY_TIMEOUT_S = 2.0
FINAL_FLUSH_TIMEOUT_S = 2.0  # a stopping leader's last slot updates to its nodes
EVICT_BATCH = 1024  # victims per eviction pass
# Deferred layer commits queued for a node that go out at once (else with the background flush):
# about two layers of a 2048-page request, ~0.3 ms of the node's apply
DEFERRED_COMMIT_RECORDS = 4096
EVICT_PASSES_ON_DEMAND = 4
EVICT_PASSES_PER_TICK = 2
LEASE_HORIZON_KEY = "lease_horizon"  # unix ms; see Master._cover_lease
HORIZON_SLACK_S = 1.0  # wall clocks of two masters may differ by this much
ADMIN_FREE_CHUNK = 65_536  # rows freed between yields to the event loop

Clock = Callable[[], float]


@dataclass
class Namespace:
    ns_id: int
    spec: pb.NamespaceSpec
    layout: Layout
    root: bytes
    allocated_bytes: int = 0  # slot bytes of its live rows (quota accounting)
    deleted: bool = False

    @property
    def name(self) -> str:
        return self.spec.name


def _mismatch(stored: pb.NamespaceSpec, wanted: pb.NamespaceSpec) -> str:
    """Why two specs are not the same namespace ('' if they are; the quota may differ)."""
    for name in ("page_size", "num_layers", "segment_bytes", "fingerprint", "salt"):
        if getattr(stored, name) != getattr(wanted, name):
            return name
    if stored.HasField("geometry") != wanted.HasField("geometry") or stored.geometry != wanted.geometry:
        return "geometry"
    return ""


def _unique_in_order(values: np.ndarray) -> list[int]:
    uniq, first = np.unique(values, return_index=True)
    return [int(v) for v in uniq[np.argsort(first)]]


class Master:
    """The leader's in-memory state and every operation on it."""

    def __init__(
        self,
        cfg: Config,
        metadata: MetadataBackend,
        clock: Clock = time.time,
        placement: PlacementStrategy | None = None,
        eviction: EvictionPolicy | None = None,
        sender: Sender | None = None,
    ) -> None:
        self.cfg = cfg
        self.metadata = metadata
        self.clock = clock
        self.index = PageIndex()
        self.nodes = NodeRegistry(
            node_ttl_s=cfg.node_ttl_ms / 1000.0,
            rpc_timeout_s=min(NODE_RPC_TIMEOUT_S, max(0.5, cfg.node_ttl_ms / 1000.0)),
            max_message_bytes=cfg.max_message_bytes,
            clock=clock,
        )
        self.sessions = SessionTable(self.index)
        self.leases = LeaseTable(self.index)
        self.streams = StreamTable(
            self
        )  # StreamPrefix: leases on pages being written, woken by the hooks below
        self.extras = ExtrasStore(cfg.extras_budget)
        self.placement = placement or HostThenMostFree()
        self.eviction = eviction or LruLeavesFirst()
        self.tiering = Tiering(self)  # tiers: watermarks, demotion/promotion, pins, drain
        self.notifier = Notifier(
            sender or self.nodes.send_updates,
            term=lambda: self.term,
            on_failure=self._node_failing,
            clock=clock,
            post=None if sender else self.nodes.post_updates,
        )
        self.namespaces: dict[str, Namespace] = {}
        self._by_ns_id: dict[int, Namespace] = {}
        self._free_ns_ids = list(range(MAX_NAMESPACES - 1, -1, -1))
        self.leadership = Leadership(term=0, leader_address="")
        self.grant_secret = b""
        self.secret_configured = False
        self.hits = 0
        self.lookups = 0
        self.led_since = 0.0  # when this master's leadership began (clock())
        # Leases granted by any leader of this cluster end before this (unix seconds, in the
        # metadata store): a successor keeps its hands off adopted pages until then.
        self._lease_horizon = 0.0
        self._inherited_until = 0.0  # clock() time until which the predecessor's leases may live
        self._horizon_lock = asyncio.Lock()
        # (namespace id, parent key) -> [(row, epoch)] of adopted pages whose parent is not known yet
        self._awaiting_parent: dict[tuple[int, bytes], list[tuple[int, int]]] = {}
        # registrations learnt from the node watch, node flushes of deferred commits
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ life cycle
    @property
    def term(self) -> int:
        return self.leadership.term

    @property
    def warmup_s(self) -> float:
        """How long a new leader keeps its hands off what it adopted (leases of its predecessor may live)."""
        ms = (
            self.cfg.warmup_ms
            if self.cfg.warmup_ms >= 0
            else max(self.cfg.read_lease_ms, self.cfg.write_lease_ms)
        )
        return ms / 1000.0

    async def _cover_lease(self, expires: float) -> None:
        """Record, before granting it, a lease longer than a successor's default warm-up.

        A new leader keeps its hands off adopted pages for ``warmup_s`` (which
        covers every lease of the default lengths) or until the recorded
        horizon, whichever is later.  Only leases a client asked to be longer
        cost a fenced metadata write, and only when they end past the horizon.
        """
        if expires - self.clock() <= self.warmup_s:
            return
        end = time.time() + (expires - self.clock()) + HORIZON_SLACK_S
        if end <= self._lease_horizon:
            return
        async with self._horizon_lock:
            if end <= self._lease_horizon:
                return
            await self.metadata.put_if_leader(
                LEASE_HORIZON_KEY, str(int(end * 1000)).encode(), self.leadership
            )
            self._lease_horizon = end

    def leading(self) -> bool:
        """Still the leader (local check, no I/O: False once the lease can no longer be proven)."""
        return self.leadership.term > 0 and self.metadata.leading(self.leadership)

    def check_leading(self) -> None:
        """Raise NOT_LEADER unless this master still leads; called before anything is granted or changed."""
        if not self.leading():
            raise KVStoreError(
                ErrorCode.NOT_LEADER,
                f"this master's leadership (term {self.term}) has ended; ask the new leader",
            )

    async def start(self, address: str, background: bool = True) -> None:
        """Lead (campaign), load the grant secret and namespaces, start the background work."""
        await self.lead(await self.metadata.campaign(address), background)

    async def lead(self, leadership: Leadership, background: bool = True) -> None:
        """Take up ``leadership`` (won by a campaign): load the grant secret and namespaces, start background work."""
        self.leadership = leadership
        self.led_since = self.clock()
        address = leadership.leader_address
        if self.cfg.grant_secret:
            try:
                self.grant_secret = bytes.fromhex(self.cfg.grant_secret)
            except ValueError as exc:
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "grant_secret must be hex") from exc
            if not self.grant_secret:
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "grant_secret is empty")
            self.secret_configured = True
        else:
            self.grant_secret = await self.metadata.get_or_create("grant_secret", os.urandom(32))
        for raw in (await self.metadata.list_namespaces()).values():
            spec = pb.NamespaceSpec.FromString(raw)
            self._register_namespace(spec, Layout.from_spec(spec))
        horizon = await self.metadata.get_value(LEASE_HORIZON_KEY)
        self._lease_horizon = int(horizon) / 1000.0 if horizon else 0.0
        self._inherited_until = self.led_since + max(0.0, self._lease_horizon - time.time())
        if background:
            self.notifier.start()
            self._tasks.append(
                asyncio.get_running_loop().create_task(self._sweeper(), name="kvstore-sweeper")
            )
        log.info("leading with term %d at %s", self.term, address)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for side in list(self._side_tasks):
            side.cancel()
        if self._side_tasks:
            await asyncio.gather(*self._side_tasks, return_exceptions=True)
        self.streams.close(KVStoreError(ErrorCode.UNAVAILABLE, "the master is stopping"))
        await self.tiering.stop()
        await self.notifier.stop()
        if self.leading():
            # A clean stop hands its successor complete inventories: send what is still queued.
            try:
                await asyncio.wait_for(self.notifier.flush_all(), FINAL_FLUSH_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                log.warning("slot updates not delivered at shutdown: %s", exc)
        await self.nodes.close()

    # ------------------------------------------------------------------ namespaces
    def _register_namespace(self, spec: pb.NamespaceSpec, layout: Layout) -> Namespace:
        existing = self.namespaces.get(spec.name)
        if existing is not None:
            return existing
        if not self._free_ns_ids:
            raise KVStoreError(ErrorCode.TOO_LARGE, f"more than {MAX_NAMESPACES} namespaces")
        ns = Namespace(self._free_ns_ids.pop(), spec, layout, keys.namespace_root(spec.name, spec.salt))
        self.index.add_namespace(ns.ns_id, layout.slot_bytes, layout.num_layers, layout.kv_heads)
        self.namespaces[spec.name] = ns
        self._by_ns_id[ns.ns_id] = ns
        return ns

    async def create_namespace(self, spec: pb.NamespaceSpec) -> tuple[pb.NamespaceSpec, bool]:
        if len(spec.fingerprint) > MAX_BLOB_FIELD or len(spec.salt) > MAX_BLOB_FIELD:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"fingerprint and salt are limited to {MAX_BLOB_FIELD} bytes"
            )
        layout = Layout.from_spec(spec)
        stored = pb.NamespaceSpec(
            name=spec.name,
            page_size=layout.page_size,
            num_layers=layout.num_layers,
            segment_bytes=layout.segment_bytes,
            fingerprint=spec.fingerprint,
            salt=spec.salt,
            quota_bytes=spec.quota_bytes,
        )
        if layout.kind:
            stored.geometry.CopyFrom(
                pb.Geometry(
                    kind=layout.kind, kv_heads=layout.kv_heads, head_dim=layout.head_dim, dtype=layout.dtype
                )
            )
        self.check_leading()
        existing_raw = await self.metadata.put_namespace_if_absent(
            spec.name, stored.SerializeToString(), leadership=self.leadership
        )
        if existing_raw is None:
            self._register_namespace(stored, layout)
            log.info("namespace %s created: %d-byte slots", spec.name, layout.slot_bytes)
            return stored, True
        existing = pb.NamespaceSpec.FromString(existing_raw)
        differs = _mismatch(existing, stored)
        if differs:
            raise KVStoreError(
                ErrorCode.NAMESPACE_MISMATCH,
                f"namespace {spec.name!r} exists with a different {differs}; delete it first or use another name",
            )
        self._register_namespace(existing, Layout.from_spec(existing))
        return existing, False

    async def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is not None:
            return ns
        raw = await self.metadata.get_namespace(name) if name else None
        if raw is None:
            raise KVStoreError(ErrorCode.NAMESPACE_NOT_FOUND, f"namespace {name!r} is not registered")
        spec = pb.NamespaceSpec.FromString(raw)
        return self._register_namespace(spec, Layout.from_spec(spec))

    async def list_namespaces(self) -> list[pb.NamespaceSpec]:
        stored = await self.metadata.list_namespaces()
        return [pb.NamespaceSpec.FromString(stored[name]) for name in sorted(stored)]

    async def delete_namespace(self, name: str) -> int:
        """Drop a namespace: its pages become unmatchable now; leased ones are freed when their leases end."""
        ns = await self.namespace(name)
        self.check_leading()
        await self.metadata.delete_namespace(name, leadership=self.leadership)
        if self.namespaces.get(name) is not ns:
            return 0  # deleted concurrently
        del self.namespaces[name]
        ns.deleted = True
        self.index.drop_namespace_table(ns.ns_id)
        self.sessions.drop_namespace(ns.ns_id)
        self.extras.drop_namespace(name)
        high = self.index.high
        rows = np.flatnonzero((self.index.ns[:high] == ns.ns_id) & (self.index.state[:high] != FREE))
        unleased = self._doom_leased(rows)
        freed = await self._free_in_chunks(unleased)
        self._retire_namespace_if_empty(ns)
        log.info(
            "namespace %s deleted: %d pages freed, %d held by leases", name, freed, len(rows) - len(unleased)
        )
        return freed

    def _doom_leased(self, rows: np.ndarray) -> np.ndarray:
        """Of rows to drop, make those a read lease holds DOOMED; return the others (to free now).

        A DOOMED row is unmatchable and its key forgotten (a new put of the sequence
        gets a fresh row); its slot stays and is freed when its last lease ends
        (:meth:`_free_doomed`), so nothing under a lease is freed (invariant 2).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return rows
        index = self.index
        held = (index.lease_count[rows] > 0) & (index.state[rows] != FREE)
        if not held.any():
            return rows
        doomed = rows[held]
        ns_of = index.ns[doomed]
        for ns_id in np.unique(ns_of).tolist():
            sel = doomed[ns_of == ns_id]
            table = index.tables.get(ns_id)
            if table is not None:
                table.delete(sel)
            index.state[sel] = DOOMED
            self.streams.rows_changed(ns_id, sel)
        log.info("%d pages held by read leases: freed when those end", len(doomed))
        return rows[~held]

    def _retire_namespace_if_empty(self, ns: Namespace) -> None:
        if ns.deleted and self.index.ns_rows[ns.ns_id] == 0 and self._by_ns_id.get(ns.ns_id) is ns:
            del self._by_ns_id[ns.ns_id]
            self.index.forget_namespace(ns.ns_id)
            self._free_ns_ids.append(ns.ns_id)

    # ------------------------------------------------------------------ nodes
    async def register_node(self, request: pb.RegisterNodeRequest) -> pb.RegisterNodeResponse:
        if not request.node_id or len(request.node_id) > 256:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "node_id must be 1-256 characters")
        if len(request.incarnation) != 16:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "incarnation must be 16 bytes")
        if not request.control_address or not request.data_address:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "control_address and data_address are required")
        capacity = request.regions[0].capacity_bytes if request.regions else 0
        if capacity < 4096:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "a node needs a region of at least 4 KiB")
        tiers = [r.tier or "dram" for r in request.regions]
        if tiers[0] != "dram" or len(set(tiers)) != len(tiers) or not set(tiers) <= set(TIERS):
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"regions must be one DRAM region first, then at most one of each other tier {TIERS}; got {tiers}",
            )
        if any(r.capacity_bytes < 4096 for r in request.regions):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "every region needs at least 4 KiB")
        self.tiering.check_registration(request.node_id, bytes(request.incarnation))
        self.check_leading()
        response = pb.RegisterNodeResponse(
            term=self.term,
            heartbeat_ms=self.cfg.heartbeat_ms,
            grant_secret=b"" if self.secret_configured else self.grant_secret,
        )
        existing = self.nodes.get(request.node_id)
        if existing is not None and existing.incarnation == request.incarnation and existing.alive:
            existing.last_heartbeat = self.clock()  # a retried registration
            return response
        if existing is not None:
            log.warning("node %s restarted: dropping the pages of its previous incarnation", request.node_id)
            self._drop_node(existing)
        departed = self.nodes.departed.get(request.node_id)
        comeback = departed is not None and departed.incarnation == request.incarnation
        record: NodeRecord | None = None
        for position, region in enumerate(request.regions):
            floor = 0
            if comeback and departed is not None:
                # the same region came back: its slots must not see a generation it has seen before
                for old in departed.regions or [departed]:
                    if old.tier == tiers[position]:
                        floor = int(old.allocator.generations.max()) + 1
            allocator = RegionAllocator(
                region.capacity_bytes, self.cfg.arena_bytes, self.cfg.quarantine_s, self.clock, floor
            )
            added = self.nodes.add(request, allocator, position, record)
            added.ready = False  # not placed on until its old inventory is accounted for
            record = record or added
        assert record is not None
        adopted = 0
        try:
            for region_record in record.regions:
                adopted += await self._adopt_inventory(region_record, comeback)
        except BaseException:
            # Without its inventory we cannot tell its slots apart: forget it; it registers again.
            if self.nodes.by_index.get(record.index) is record:
                self._drop_node(record, quiet=True)
                if departed is not None:
                    self.nodes.departed[request.node_id] = departed
                else:
                    self.nodes.departed.pop(request.node_id, None)
            raise
        finally:
            for region_record in record.regions:
                region_record.ready = True
                region_record.last_heartbeat = self.clock()
        log.info(
            "node %s registered (index %d, host %s, %d bytes, %d pages adopted)",
            record.node_id,
            record.index,
            record.host_id,
            capacity,
            adopted,
        )
        return response

    async def _adopt_inventory(self, record: NodeRecord, comeback: bool = False) -> int:
        """Take over what the node still holds: complete pages join the index, everything else is freed.

        A new leader (or a restarted master, or this one after the node lapsed)
        learns the node's slots from its inventory.  Complete pages (every head of
        every layer committed, as the node was told by a leader) are adopted with
        their generations; partial pages, pages of unknown namespaces and duplicates
        are freed with generations above any the region has used, and quarantined.
        Slots the node does not report are free.  ``comeback``: the same incarnation
        returns after this master dropped it.  A leader that follows another one
        first tells the node its term, so the old leader's grants and updates are
        refused from then on.  Returns the number of pages adopted.
        """
        if self.term > 1 and not await self.notifier.announce_term(record.index):
            raise KVStoreError(ErrorCode.UNAVAILABLE, f"node {record.node_id} did not take the new term")
        try:
            inventory = await asyncio.wait_for(self.nodes.inventory(record), INVENTORY_TIMEOUT_S)
        except Exception as exc:
            raise KVStoreError(
                ErrorCode.UNAVAILABLE, f"could not read the inventory of node {record.node_id}: {exc}"
            ) from exc
        table = parse_inventory(inventory)
        allocator = record.allocator
        if len(table) or table.highest_generation:
            # Writers may still hold slots here under leases this master does not know: those of a
            # previous leader, or its own from before the node lapsed (its allocator, quarantines
            # included, went with it).  No allocation, no eviction here until they have run out.
            if self.term > 1:
                record.warm_until = max(self.led_since + self.warmup_s, self._inherited_until)
            if comeback:
                record.warm_until = max(record.warm_until, self.clock() + self.warmup_s)
        if not len(table):
            if table.highest_generation:
                allocator.generations[:] = np.maximum(allocator.generations, table.highest_generation + 1)
            return 0
        layouts: dict[int, Namespace] = {}
        for ns_index, name in enumerate(table.namespaces):
            try:
                ns = await self.namespace(name)
            except KVStoreError:
                continue  # deleted meanwhile: its pages go
            layouts[ns_index] = ns
        self.check_leading()
        floor = max(table.highest_generation + 1, int(allocator.generations.max()))
        allocator.generations[:] = np.maximum(allocator.generations, floor)
        keep = np.zeros(len(table), dtype=bool)
        adopted = 0
        if table.well_formed:
            for ns_index, ns in layouts.items():
                if ns.deleted or self.namespaces.get(ns.name) is not ns:
                    continue
                layout = ns.layout
                positions = np.flatnonzero(
                    (table.ns_index == ns_index) & (table.slot_bytes == np.uint64(layout.slot_bytes))
                )
                positions = positions[complete_pages(table, positions, layout.num_layers, layout.kv_heads)]
                positions = positions[first_of_each_key(table.keys[positions])]
                present = self.index.lookup(ns.ns_id, table.keys[positions].tobytes()) >= 0
                positions = positions[~present]  # another copy is indexed already: first one wins
                taken = allocator.adopt(
                    table.slots[positions], layout.slot_bytes, table.generations[positions]
                )
                positions = positions[taken]
                self._insert_adopted(ns, record.index, table, positions)
                keep[positions] = True
                adopted += len(positions)
        self._free_unadopted(record, table, ~keep, floor)
        return adopted

    def _insert_adopted(self, ns: Namespace, node: int, table: InventoryTable, positions: np.ndarray) -> None:
        """Index adopted complete pages, linking them to their parents (and waiting children to them)."""
        count = len(positions)
        if not count:
            return
        index, now = self.index, self.clock()
        packed = table.keys[positions].tobytes()
        rows = index.alloc(count)
        index.insert(
            ns.ns_id,
            rows,
            packed,
            np.full(count, node, dtype=np.uint16),
            table.slots[positions],
            table.generations[positions],
            now,
        )
        index.complete(rows, now)
        index.layers_complete[rows] = ns.layout.num_layers
        ns.allocated_bytes += count * ns.layout.slot_bytes

        parent_keys = table.parents[positions]
        root = np.frombuffer(ns.root, dtype=np.uint8)
        at_root = ~parent_keys.any(axis=1) | (parent_keys == root).all(axis=1)
        found = index.lookup(ns.ns_id, np.ascontiguousarray(parent_keys).tobytes())
        safe = np.where(found >= 0, found, 0)
        found = np.where((found >= 0) & (index.state[safe] != FREE), found, ORPHAN)
        parents = np.where(at_root, ROOT, found)
        index.parent[rows] = parents
        linked = parents[parents >= 0]
        if len(linked):
            np.add.at(index.child_count, linked, np.uint32(1))
        epochs = index.epoch[rows]
        for i in np.flatnonzero(parents == ORPHAN).tolist():
            self._awaiting_parent.setdefault((ns.ns_id, parent_keys[i].tobytes()), []).append(
                (int(rows[i]), int(epochs[i]))
            )
        # children adopted earlier (from other nodes) that were waiting for one of these pages
        for i, row in enumerate(rows.tolist()):
            waiting = self._awaiting_parent.pop((ns.ns_id, packed[i * KEY : (i + 1) * KEY]), None)
            for child, epoch in waiting or ():
                if (
                    index.epoch[child] == epoch
                    and index.state[child] != FREE
                    and index.parent[child] == ORPHAN
                ):
                    index.parent[child] = row
                    index.child_count[row] += 1
        self._prune_awaiting()

    def _prune_awaiting(self) -> None:
        """Forget waiting children that were freed meanwhile (their rows were recycled)."""
        index = self.index
        for key in list(self._awaiting_parent):
            alive = [
                (row, epoch)
                for row, epoch in self._awaiting_parent[key]
                if index.epoch[row] == epoch and index.state[row] != FREE and index.parent[row] == ORPHAN
            ]
            if alive:
                self._awaiting_parent[key] = alive
            else:
                del self._awaiting_parent[key]

    def _free_unadopted(
        self, record: NodeRecord, table: InventoryTable, drop: np.ndarray, floor: int
    ) -> None:
        """Free what was not adopted at generation ``floor``; quarantine the slots the allocator can hold."""
        positions = np.flatnonzero(drop)
        if not len(positions):
            return
        allocator = record.allocator
        slots = table.slots[positions]
        quarantined = np.zeros(len(positions), dtype=bool)
        if table.well_formed:
            sizes = table.slot_bytes[positions]
            for size in np.unique(sizes).tolist():
                sel = np.flatnonzero(sizes == size)
                # adopted one generation below the floor, so that the free lands exactly on it
                taken = allocator.adopt(slots[sel], int(size), np.full(len(sel), floor - 1, dtype=np.uint32))
                if taken.any():
                    allocator.free(slots[sel[taken]])
                quarantined[sel[taken]] = True
        self.notifier.enqueue_free(record.index, slots, np.full(len(slots), floor, dtype=np.uint32))
        log.warning(
            "node %s held %d slots that are not complete pages this leader can adopt; freeing them (%d quarantined)",
            record.node_id,
            len(slots),
            int(np.count_nonzero(quarantined)),
        )

    # -- the node registrations in the metadata backend (etcd): learn nodes, notice them go
    async def adopt_registered_nodes(self) -> int:
        """Register every node the metadata backend lists (a new leader's rebuild); returns how many joined."""
        infos = await self.metadata.list_nodes()
        requests = [req for req in (self._decode_registration(n, i) for n, i in infos.items()) if req]
        results = await asyncio.gather(*(self.register_node(r) for r in requests), return_exceptions=True)
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("node %s not adopted yet (%s); it will register itself", request.node_id, result)
        return sum(not isinstance(r, BaseException) for r in results)

    async def follow_registrations(self) -> None:
        """Apply node registration changes until cancelled: a lapsed registration takes its node's pages."""
        async for event in self.metadata.watch_nodes(include_existing=True):
            if event.kind == NODE_DELETE:
                record = self.nodes.get(event.node_id)
                if record is not None:
                    log.warning("node %s: its registration lapsed; removing it", event.node_id)
                    self._drop_node(record)
            elif event.kind == NODE_PUT:
                request = self._decode_registration(event.node_id, event.info)
                record = self.nodes.get(event.node_id)
                if request is None or (
                    record is not None and record.incarnation == request.incarnation and record.alive
                ):
                    continue
                task = asyncio.get_running_loop().create_task(self._register_quietly(request))
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)

    async def _register_quietly(self, request: pb.RegisterNodeRequest) -> None:
        try:
            await self.register_node(request)
        except KVStoreError as exc:
            log.info("node %s not adopted from its registration (%s)", request.node_id, exc.message)

    @staticmethod
    def _decode_registration(node_id: str, info: bytes) -> pb.RegisterNodeRequest | None:
        """A node's registration record is its RegisterNodeRequest; anything else is ignored."""
        try:
            request = pb.RegisterNodeRequest.FromString(info)
        except Exception:  # noqa: BLE001 - a foreign or corrupt record
            log.warning("node registration %s does not parse; ignoring it", node_id)
            return None
        return request if request.node_id == node_id else None

    def heartbeat(self, node_id: str, incarnation: bytes) -> bool:
        return self.nodes.heartbeat(node_id, incarnation)

    def _node_failing(self, node: int, since: float) -> None:
        record = self.nodes.by_index.get(node)
        if record is not None and self.clock() - since >= self.nodes.node_ttl_s:
            log.warning(
                "node %s unreachable for %.1f s: declaring it dead", record.node_id, self.clock() - since
            )
            self._drop_node(record)

    def _drop_node(self, record: NodeRecord, quiet: bool = False) -> int:
        """A node incarnation is gone: every page it held goes (reads become misses), children become orphans.

        Every region of the node goes with it (tiers: ``record`` may be any of them).
        """
        record = record.primary or record
        regions = list(record.regions or [record])
        high = self.index.high
        indices = np.array([r.index for r in regions], dtype=np.uint16)
        rows = np.flatnonzero(np.isin(self.index.node[:high], indices) & (self.index.state[:high] != FREE))
        self._forget_rows(rows)
        for region in regions:
            self.notifier.drop(region.index)
            self.nodes.remove(region)
        if not quiet:
            log.warning("node %s (index %d) removed with %d pages", record.node_id, record.index, len(rows))
        return len(rows)

    # ------------------------------------------------------------------ freeing
    def _free_rows(self, rows: np.ndarray, evicted: bool = False) -> int:
        """Free pages: slot generations bumped, nodes told, slots quarantined, rows recycled."""
        index = self.index
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        rows = rows[index.state[rows] != FREE]
        if not len(rows):
            return 0
        node_of = index.node[rows]
        for node in np.unique(node_of).tolist():
            sel = rows[node_of == node]
            record = self.nodes.by_index.get(node)
            if record is None:
                continue  # the node is gone and its slots with it
            if evicted:
                record.evictions += len(sel)
                # Evicted complete pages have no writer left and no lease (the generation bump
                # turns a reader whose lease lapsed into a miss): they skip the quarantine
                # unless the operator asks for one (docs/decisions.md).
                complete = index.state[sel] == COMPLETE
                groups = [(sel[complete], self.cfg.evicted_quarantine_ms / 1000.0), (sel[~complete], None)]
            else:
                groups = [(sel, None)]
            for group, quarantine_s in groups:
                if len(group):
                    slots = index.slot[group]
                    generations = record.allocator.free(slots, quarantine_s)
                    self.notifier.enqueue_free(node, slots, generations)
        self._forget_rows(rows)
        return len(rows)

    def _forget_rows(self, rows: np.ndarray) -> None:
        """Index side of a free (slots already dealt with): unlink from the tree, account, recycle."""
        index = self.index
        if not len(rows):
            return
        self.streams.rows_freed(rows)
        index.unlink(rows)
        ns_of = index.ns[rows]
        for ns_id in np.unique(ns_of).tolist():
            ns = self._by_ns_id.get(ns_id)
            if ns is not None:
                ns.allocated_bytes -= int(np.count_nonzero(ns_of == ns_id)) * ns.layout.slot_bytes
        index.release(rows)
        for ns_id in np.unique(ns_of).tolist():
            ns = self._by_ns_id.get(ns_id)
            if ns is not None and ns.deleted:
                self._retire_namespace_if_empty(ns)

    async def _free_in_chunks(self, rows: np.ndarray, evicted: bool = False) -> int:
        freed = 0
        for start in range(0, len(rows), ADMIN_FREE_CHUNK):
            freed += self._free_rows(rows[start : start + ADMIN_FREE_CHUNK], evicted=evicted)
            await asyncio.sleep(0)  # let other requests in between chunks
        return freed

    # ------------------------------------------------------------------ eviction
    def evict(
        self,
        need_bytes: int,
        node: int | None = None,
        namespace: int | None = None,
        exclude: np.ndarray | None = None,
        passes: int = EVICT_PASSES_ON_DEMAND,
    ) -> int:
        """Evict towards ``need_bytes`` in bounded passes (a freed leaf can make its parent a leaf).

        Pages on warming nodes are never chosen (leases of the previous leader may cover them).
        """
        freed_bytes = 0
        warming = self._warming_rows()
        if len(warming):
            exclude = warming if exclude is None else np.concatenate((exclude, warming))
        for _ in range(passes):
            if freed_bytes >= need_bytes:
                break
            victims = self.eviction.select(
                self.index,
                need_bytes - freed_bytes,
                self.clock(),
                node=node,
                namespace=namespace,
                exclude=exclude,
                max_victims=EVICT_BATCH,
            )
            if not len(victims):
                break
            freed_bytes += int(self.index.row_bytes(victims).sum())
            self._free_rows(victims, evicted=True)
        return freed_bytes

    def _watermark_eviction(self) -> None:
        """Background: a region fuller than its high watermark demotes or evicts towards its low one (tiers)."""
        self.tiering.tick()

    # ------------------------------------------------------------------ put path
    def _lease_s(self, requested_ms: int, default_ms: int) -> float:
        ms = default_ms if requested_ms <= 0 else requested_ms
        return min(ms, self.cfg.max_lease_ms) / 1000.0

    def _candidates(self) -> list[NodeCandidate]:
        now = self.clock()
        return [
            NodeCandidate(r.index, r.node_id, r.host_id, r.allocator.free_bytes, r.allocator.capacity)
            for r in self.nodes.by_index.values()
            if r.alive
            and r.ready
            and r.warm_until <= now
            and not self.notifier.failing(r.index)
            # tiers: puts go to DRAM regions (the node's primary) of nodes not being drained
            and r.primary is None
            and not r.draining
        ]

    def _warming(self) -> list[NodeRecord]:
        """Nodes adopted from a previous leader whose first lease period has not run out yet."""
        now = self.clock()
        return [r for r in self.nodes.by_index.values() if r.alive and r.warm_until > now]

    def _warming_rows(self) -> np.ndarray:
        """Rows on warming nodes (never evicted: old leases may still cover them)."""
        warming = self._warming()
        if not warming:
            return np.zeros(0, dtype=np.int64)
        high = self.index.high
        nodes = np.array([r.index for r in warming], dtype=np.uint16)
        return np.flatnonzero(np.isin(self.index.node[:high], nodes) & (self.index.state[:high] != FREE))

    def _warming_up_error(self) -> KVStoreError:
        warming = self._warming()
        wait_ms = max(1, int((max(r.warm_until for r in warming) - self.clock()) * 1000))
        return KVStoreError(
            ErrorCode.UNAVAILABLE,
            f"leader warming up: node(s) {', '.join(sorted(r.node_id for r in warming))} may still be written "
            f"under the previous leader's leases; nothing is allocated there for {wait_ms} ms more, retry then",
            retry_after_ms=wait_ms,
        )

    def _allocate(
        self,
        slot_bytes: int,
        count: int,
        writer_host: str,
        reader_host: str,
        exclude: np.ndarray,
        prefer_tier: str = "",
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to ``count`` slots in placement order: (node index u16, slot offsets u64, generations u32).

        ``prefer_tier="vram"``: first the VRAM regions of the nodes in placement order that are
        below their high watermark, then DRAM as usual (eviction, if needed, is on DRAM only).
        """
        order = self.placement.order(self._candidates(), writer_host, reader_host)
        nodes: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        gens: list[np.ndarray] = []

        if prefer_tier == "vram":
            remaining = count
            for region in self.tiering.vram_regions([self.nodes.by_index[n] for n in order]):
                if remaining <= 0:
                    break
                got_slots, got_gens = region.allocator.allocate(slot_bytes, remaining)
                if len(got_slots):
                    nodes.append(np.full(len(got_slots), region.index, dtype=np.uint16))
                    slots.append(got_slots)
                    gens.append(got_gens)
                    remaining -= len(got_slots)
            count = remaining

        def fill(remaining: int) -> int:
            for node in order:
                if remaining <= 0:
                    break
                got_slots, got_gens = self.nodes.by_index[node].allocator.allocate(slot_bytes, remaining)
                if len(got_slots):
                    nodes.append(np.full(len(got_slots), node, dtype=np.uint16))
                    slots.append(got_slots)
                    gens.append(got_gens)
                    remaining -= len(got_slots)
            return remaining

        remaining = fill(count)
        if remaining > 0 and order:
            need = remaining * slot_bytes
            if need > 0 and self.evict(need, node=order[0], exclude=exclude) > 0:
                fill(remaining)
        if not slots:
            return np.zeros(0, np.uint16), np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        return np.concatenate(nodes), np.concatenate(slots), np.concatenate(gens)

    def _quota_pages(self, ns: Namespace, wanted: int, exclude: np.ndarray) -> int:
        """How many new pages the namespace quota allows (evicting its own LRU leaves first)."""
        quota = ns.spec.quota_bytes
        if not quota or wanted == 0:
            return wanted
        slot_bytes = ns.layout.slot_bytes
        over = ns.allocated_bytes + wanted * slot_bytes - quota
        if over > 0:
            self.evict(over, namespace=ns.ns_id, exclude=exclude)
        return max(0, min(wanted, (quota - ns.allocated_bytes) // slot_bytes))

    async def open_put(
        self,
        namespace: str,
        packed_keys: bytes,
        parent_key: bytes = b"",
        tp_rank: int = 0,
        tp_size: int = 1,
        client_host: str = "",
        reader_host: str = "",
        lease_ms: int = 0,
        prefer_tier: str = "",
    ) -> pb.OpenPutResponse:
        if prefer_tier not in ("", "dram", "vram"):
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"prefer_tier must be '', 'dram' or 'vram', got {prefer_tier!r}"
            )
        ns = await self.namespace(namespace)
        self.check_leading()
        await self._cover_lease(self.clock() + self._lease_s(lease_ms, self.cfg.write_lease_ms))
        layout = ns.layout
        heads = layout.head_range(tp_rank, tp_size)
        count = len(packed_keys) // KEY
        key_items = np.frombuffer(packed_keys, dtype=f"V{KEY}")
        # Duplicates: distinct first halves prove distinct keys (a sort of u64s); only a repeated
        # half pays for the 16-byte comparison (np.unique of V16 costs 0.2 ms for 2048 keys).
        first_halves = np.sort(np.frombuffer(packed_keys, dtype=np.uint64)[::2])
        if np.any(first_halves[1:] == first_halves[:-1]) and len(np.unique(key_items)) != count:
            raise KVStoreError(ErrorCode.BAD_KEYS, "duplicate page keys in one request")
        if len(parent_key) == KEY and np.any(key_items == np.frombuffer(parent_key, dtype=f"V{KEY}")[0]):
            raise KVStoreError(ErrorCode.BAD_KEYS, "parent_key is one of the request's own page keys")
        index = self.index
        now = self.clock()
        expires = now + self._lease_s(lease_ms, self.cfg.write_lease_ms)

        parent_row = ROOT
        if parent_key and parent_key != ns.root:
            parent_row = int(index.lookup(ns.ns_id, parent_key)[0])
            if parent_row < 0 or index.state[parent_row] not in (PENDING, COMPLETE):
                raise KVStoreError(
                    ErrorCode.INVALID_ARGUMENT,
                    "parent_key names a page that is not stored (evicted?): put the sequence from its first page",
                )
        rows = index.lookup(ns.ns_id, packed_keys)
        present = rows[rows >= 0]
        exclude = np.append(present, parent_row) if parent_row >= 0 else present

        # -- slots for absent pages, in page order; the first that gets none ends the request
        absent_pos = np.flatnonzero(rows < 0)
        allowed = self._quota_pages(ns, len(absent_pos), exclude)
        node_of_new, slot_of_new, gen_of_new = self._allocate(
            layout.slot_bytes, allowed, client_host, reader_host, exclude, prefer_tier
        )
        got = len(slot_of_new)
        if got == 0 and allowed > 0 and self._warming():
            raise self._warming_up_error()
        cutoff = int(absent_pos[got]) if got < len(absent_pos) else count
        new_pos = absent_pos[:got]
        new_rows = index.alloc(got)
        all_keys = np.frombuffer(packed_keys, dtype=np.uint8).reshape(count, KEY)
        index.insert(
            ns.ns_id, new_rows, all_keys[new_pos].tobytes(), node_of_new, slot_of_new, gen_of_new, now
        )
        ns.allocated_bytes += got * layout.slot_bytes
        if got:
            self.streams.pages_added(ns.ns_id)
        rows = rows.copy()
        rows[new_pos] = new_rows

        # -- parent links of the pages this request covers
        kept = rows[:cutoff]
        expected_parent = np.empty(cutoff, dtype=np.int64)
        if cutoff:
            expected_parent[0] = parent_row
            expected_parent[1:] = kept[:-1]
        index.parent[new_rows] = expected_parent[new_pos]
        relink = (index.parent[kept] == ORPHAN) & (expected_parent != ORPHAN)
        index.parent[kept[relink]] = expected_parent[relink]
        gained = np.concatenate((expected_parent[new_pos], expected_parent[relink]))
        gained = gained[gained >= 0]
        if len(gained):
            np.add.at(index.child_count, gained, np.uint32(1))

        # -- status per page
        status = np.full(count, pb.PAGE_NO_ROOM, dtype=np.uint8)
        status[:cutoff] = pb.PAGE_ALREADY_STORED
        status[new_pos] = pb.PAGE_NEW
        shared_pos = np.flatnonzero(index.state[kept] == PENDING)
        shared_pos = shared_pos[~np.isin(shared_pos, new_pos)]
        if len(shared_pos):
            pending = index.pending[ns.ns_id]
            free_heads = pending.available(index.pend[kept[shared_pos]], heads)
            status[shared_pos[free_heads]] = pb.PAGE_NEW
        writer_pos = np.flatnonzero(status == pb.PAGE_NEW)
        writer_rows = rows[writer_pos]
        if not len(writer_rows):
            # nothing for this writer to write: no session to expire later (session_id 0)
            return pb.OpenPutResponse(
                session_id=0,
                status=status.tobytes(),
                placements=pb.Placements(slot_bytes=layout.slot_bytes),
                head_begin=heads[0],
                head_end=heads[1],
                expires_unix_ms=int(expires * 1000),
                term=self.term,
            )
        session = self.sessions.open(ns.ns_id, ns.name, writer_rows, heads, layout.num_layers, expires)

        # -- tell the nodes about the new slots before anyone writes to them
        parents = np.zeros((count, KEY), dtype=np.uint8)
        parents[1:] = all_keys[:-1]
        if parent_row >= 0:
            parents[0] = np.frombuffer(parent_key, dtype=np.uint8)
        touched = _unique_in_order(node_of_new) if got else []
        for node in touched:
            sel = node_of_new == node
            self.notifier.enqueue_assign(
                node,
                ns.name,
                slot_of_new[sel],
                gen_of_new[sel],
                all_keys[new_pos[sel]].tobytes(),
                parents[new_pos[sel]].tobytes(),
                layout.slot_bytes,
            )
        flushes = [asyncio.ensure_future(self.notifier.flush(node)) for node in touched]
        # Build the answer while the nodes apply the assignments: two loop turns put the RPCs on
        # the wire (the flush task, then grpc's call task); the placements and their grants are
        # pure computation on rows nobody else knows of yet.
        if flushes:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        placement_rows = np.full(count, -1, dtype=np.int64)
        placement_rows[writer_pos] = writer_rows
        placements = self._placements(placement_rows, layout.slot_bytes, grants.WRITE, expires)
        results = await asyncio.gather(*flushes)
        # a node may also have been dropped while we waited (its queue, and our pages, went with it)
        if not self.leading():
            raise KVStoreError(ErrorCode.NOT_LEADER, f"this master's leadership (term {self.term}) ended")
        if not all(results) or any(node not in self.nodes.by_index for node in touched):
            freed = self.sessions.abort(session.session_id)
            if freed is not None:
                self._free_rows(freed)
            raise KVStoreError(
                ErrorCode.UNAVAILABLE, "a storage node did not acknowledge its new slots; try again"
            )

        return pb.OpenPutResponse(
            session_id=session.session_id,
            status=status.tobytes(),
            placements=placements,
            head_begin=heads[0],
            head_end=heads[1],
            expires_unix_ms=int(expires * 1000),
            term=self.term,
        )

    def _session(self, session_id: int) -> tuple[PutSession, Namespace]:
        session = self.sessions.get(session_id, self.clock())
        ns = self._by_ns_id.get(session.ns_id) if session is not None else None
        if session is None or ns is None or ns.deleted:
            raise KVStoreError(ErrorCode.SESSION_NOT_FOUND, f"put session {session_id} is unknown or expired")
        return session, ns

    def commit_layer(self, session_id: int, layers: np.ndarray, checksums: np.ndarray) -> tuple[int, bool]:
        """Record committed layers of the session's head range; returns (pages completed, session done)."""
        completed, done, _ = self._commit_layer(session_id, layers, checksums)
        return completed, done

    async def commit_layer_durably(
        self, session_id: int, layers: np.ndarray, checksums: np.ndarray, deferred: bool = False
    ) -> tuple[int, bool]:
        """:meth:`commit_layer`, answered once the nodes hold the commit records.

        A new leader rebuilds the index from node inventories: a commit the
        client saw acknowledged must already be there (invariant 6).  A
        ``deferred`` commit of some of the writer's layers skips that wait: no
        page it touches is complete before the writer's last commit, which is
        durable and, the per-node queue being ordered, covers the earlier ones.
        """
        completed, done, nodes = self._commit_layer(session_id, layers, checksums)
        if nodes and (done or completed or not deferred):
            if len(nodes) == 1:
                await self.notifier.flush(nodes[0])  # no task in between for the usual single node
            else:
                await asyncio.gather(*(self.notifier.flush(node) for node in nodes))
        else:
            # Unanswered by the nodes.  The records ride the next background flush (every few ms)
            # unless enough of them queued to go at once, behind the batch in flight: the
            # writer's last, durable commit then finds at most that many still to apply, and a
            # short request's layers share one node message instead of one each (a message costs
            # the master and node ~0.3 ms of CPU each, beside the apply).
            for node in nodes:
                if self.notifier.queued_records(node) < DEFERRED_COMMIT_RECORDS:
                    continue
                task = asyncio.get_running_loop().create_task(self.notifier.flush(node, urgent=False))
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)
        return completed, done

    def _commit_layer(
        self, session_id: int, layers: np.ndarray, checksums: np.ndarray
    ) -> tuple[int, bool, list[int]]:
        self.check_leading()
        session, ns = self._session(session_id)
        layers = np.asarray(layers, dtype=np.int64)
        if not len(layers):
            raise KVStoreError(ErrorCode.BAD_RANGE, "no layers in the commit")
        bad = layers[(layers < 0) | (layers >= ns.layout.num_layers)]
        if len(bad):
            raise KVStoreError(
                ErrorCode.BAD_RANGE, f"layer {int(bad[0])} outside [0, {ns.layout.num_layers})"
            )
        if len(checksums) != len(layers) * session.num_pages:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"{len(checksums)} checksums for {len(layers)} layers x {session.num_pages} new pages",
            )
        index = self.index
        table = checksums.reshape(len(layers), session.num_pages) if session.num_pages else None
        live = index.valid(session.rows, session.epochs) & (index.state[session.rows] == PENDING)
        completed = 0
        touched: list[int] = []
        if live.any() and table is not None:
            every = bool(live.all())
            pos = np.flatnonzero(live)
            rows = session.rows if every else session.rows[pos]
            node_of = index.node[rows]
            one_node = bool((node_of == node_of[0]).all())  # the usual request: no unique, no masks
            touched = [int(node_of[0])] if one_node else np.unique(node_of).tolist()
            for node in touched:
                sel = None if one_node else node_of == node
                slots = index.slot[rows if sel is None else rows[sel]]
                sums = table if every and sel is None else table[:, pos if sel is None else pos[sel]]
                self.notifier.enqueue_commit(
                    node,
                    np.tile(slots, len(layers)),
                    np.repeat(layers, len(slots)),
                    session.heads,
                    sums.reshape(-1),
                )
            complete, full_layers = index.pending[ns.ns_id].commit(index.pend[rows], layers, session.heads)
            index.layers_complete[rows] = full_layers
            done_rows = rows[complete]
            index.complete(done_rows, self.clock())
            completed = len(done_rows)
            self.streams.rows_changed(ns.ns_id, rows)
        session.committed[layers] = True
        done = bool(session.committed.all())
        if done:
            self.sessions.finish(session)
        return completed, done, touched

    def abort_put(self, session_id: int) -> int:
        rows = self.sessions.abort(session_id)
        if rows is None:
            raise KVStoreError(ErrorCode.SESSION_NOT_FOUND, f"put session {session_id} is unknown or expired")
        return self._free_rows(self._doom_leased(rows))

    # ------------------------------------------------------------------ get path
    def _match(self, ns: Namespace, packed_keys: bytes) -> tuple[np.ndarray, int]:
        rows = self.index.lookup(ns.ns_id, packed_keys)
        matched = self.index.prefix_length(rows, self.nodes.alive)
        self.index.last_access[rows[:matched]] = self.clock()
        return rows, matched

    async def match_prefix(self, namespace: str, packed_keys: bytes) -> int:
        ns = await self.namespace(namespace)
        return self._match(ns, packed_keys)[1]

    async def acquire_prefix(
        self, namespace: str, packed_keys: bytes, lease_ms: int = 0, client_host: str = ""
    ) -> pb.AcquirePrefixResponse:
        ns = await self.namespace(namespace)
        self.check_leading()
        # Cover the lease before matching: nothing may run between the match and the lease.
        expires = self.clock() + self._lease_s(lease_ms, self.cfg.read_lease_ms)
        await self._cover_lease(expires)
        rows, matched = self._match(ns, packed_keys)
        self._count_lookups(rows, matched)
        if self.tiering.needs_promotion(rows[:matched]):
            # tiers: NVMe pages are never handed out; promote them to DRAM, then match again
            await self.tiering.promote_for_read(rows[:matched])
            self.check_leading()
            rows, matched = self._match(ns, packed_keys[: matched * KEY])
            matched = self.tiering.readable_prefix(rows, matched)
        if matched == 0:
            return pb.AcquirePrefixResponse(
                num_pages=0, placements=pb.Placements(slot_bytes=ns.layout.slot_bytes)
            )
        lease = self.leases.create(ns.ns_id, ns.name, rows[:matched], packed_keys[: matched * KEY], expires)
        return self._lease_response(lease, ns.layout.slot_bytes)

    def _count_lookups(self, rows: np.ndarray, matched: int) -> None:
        self.lookups += len(rows)
        self.hits += matched
        found = rows[rows >= 0]
        if not len(found):
            return
        asked = np.bincount(self.index.node[found].astype(np.int64))
        hit = np.bincount(self.index.node[rows[:matched]].astype(np.int64), minlength=len(asked))
        for node in np.flatnonzero(asked).tolist():
            record = self.nodes.by_index.get(node)
            if record is not None:
                record.lookups += int(asked[node])
                record.hits += int(hit[node])

    def _lease_response(self, lease: ReadLease, slot_bytes: int) -> pb.AcquirePrefixResponse:
        held = lease.valid_prefix(self.index)
        # a stream's lease also holds pages still being written: only whole pages are described
        whole = self.index.pend[lease.rows[:held]] < 0
        held = held if whole.all() else int(np.argmin(whole))
        return pb.AcquirePrefixResponse(
            lease_id=lease.lease_id,
            num_pages=held,
            placements=self._placements(lease.rows[:held], slot_bytes, grants.READ, lease.expires),
            expires_unix_ms=int(lease.expires * 1000),
            keys=lease.keys[: held * KEY],
        )

    def describe_lease(self, lease_id: str) -> pb.AcquirePrefixResponse:
        self.check_leading()
        lease = self.leases.get(lease_id, self.clock())
        if lease is None:
            raise KVStoreError(ErrorCode.LEASE_NOT_FOUND, "read lease unknown, released or expired")
        slot_bytes = int(self.index.ns_slot_bytes[lease.ns_id])
        return self._lease_response(lease, slot_bytes)

    def release_lease(self, lease_id: str) -> bool:
        unpinned = self.leases.release(lease_id)
        if unpinned is None:
            return False
        self.streams.lease_released(lease_id)
        self._free_doomed(unpinned)
        return True

    def _free_doomed(self, unpinned: np.ndarray) -> None:
        if len(unpinned):
            self._free_rows(unpinned[self.index.state[unpinned] == DOOMED])

    def pin(self, namespace: Namespace, packed_keys: bytes, ttl_s: float) -> int:
        """Keep a matched prefix out of eviction and demotion for a bounded time (hot system prompts).

        Capped by ``max_pin_ms``; matching updates recency but takes no lease.
        """
        rows, matched = self._match(namespace, packed_keys)
        until = self.clock() + max(0.0, min(ttl_s, self.cfg.max_pin_ms / 1000.0))
        self.index.pin_until[rows[:matched]] = until
        return matched

    async def pin_prefix(self, namespace: str, packed_keys: bytes, ttl_ms: int) -> tuple[int, float]:
        """PinPrefix: (pages pinned, pinned until, unix seconds)."""
        if ttl_ms <= 0:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "ttl_ms must be positive (pins are bounded)")
        ns = await self.namespace(namespace)
        self.check_leading()
        ttl_s = min(ttl_ms, self.cfg.max_pin_ms) / 1000.0
        return self.pin(ns, packed_keys, ttl_s), time.time() + ttl_s

    async def unpin_prefix(self, namespace: str, packed_keys: bytes) -> int:
        """UnpinPrefix: the matched prefix is evictable again now; returns pages unpinned."""
        ns = await self.namespace(namespace)
        self.check_leading()
        rows = self.index.lookup(ns.ns_id, packed_keys)
        matched = self.index.prefix_length(rows, self.nodes.alive)
        self.index.pin_until[rows[:matched]] = 0.0
        return matched

    def _placements(self, rows: np.ndarray, slot_bytes: int, rights: int, expires: float) -> pb.Placements:
        """Placements of pages (``rows[i] < 0``: none for page i) with one grant per node."""
        index = self.index
        count = len(rows)
        node_index = np.full(count, NO_NODE, dtype=np.uint16)
        slot_offsets = np.zeros(count, dtype=np.uint64)
        generations = np.zeros(count, dtype=np.uint32)
        placed = np.flatnonzero(rows >= 0)
        # tiers: a page on NVMe is never handed to a client (callers promote first); none here
        placed = placed[self.nodes.tier_code[index.node[rows[placed]]] != TIER_CODE["nvme"]]
        msg = pb.Placements(slot_bytes=slot_bytes)
        if len(placed):
            placed_rows = rows[placed]
            node_of = index.node[placed_rows]
            slot_offsets[placed] = index.slot[placed_rows]
            generations[placed] = index.generation[placed_rows]
            expires_ms = int(expires * 1000)
            position = 0
            for node in _unique_in_order(node_of):
                record = self.nodes.by_index.get(node)
                if record is None:
                    continue  # gone with its node: no placement (the reader sees a miss)
                sel = node_of == node
                node_index[placed[sel]] = position
                msg.nodes.append(record.ref)
                msg.grants.append(
                    grants.sign(
                        self.grant_secret,
                        record.node_id,
                        record.incarnation,
                        index.slot[placed_rows[sel]],
                        index.generation[placed_rows[sel]],
                        expires_ms,
                        self.term,
                        rights,
                        tier=record.tier,  # vram: a grant names the region its slots are in
                    )
                )
                position += 1
        msg.node_index = node_index.astype("<u2").tobytes()
        msg.slot_offsets = slot_offsets.astype("<u8").tobytes()
        msg.generations = generations.astype("<u4").tobytes()
        return msg

    # ------------------------------------------------------------------ extras
    async def put_extra(self, namespace: str, digest: bytes, name: str, data: bytes) -> None:
        await self.namespace(namespace)
        self.extras.put(namespace, digest, name, data)

    async def get_extra(self, namespace: str, digest: bytes, name: str) -> bytes:
        await self.namespace(namespace)
        data = self.extras.get(namespace, digest, name)
        if data is None:
            raise KVStoreError(ErrorCode.EXTRA_NOT_FOUND, f"no extra {name!r} for that sequence")
        return data

    # ------------------------------------------------------------------ admin
    def node_statuses(self) -> list[pb.NodeStatus]:
        index = self.index
        high = index.high
        done = index.state[:high] == COMPLETE
        complete = index.node[:high][done].astype(np.int64)
        pages = np.bincount(complete, minlength=1 << 16)
        # tiers: committed segments per region (complete pages x their layers)
        segments = np.bincount(
            complete, weights=index.layers_complete[:high][done].astype(np.float64), minlength=1 << 16
        )
        now = self.clock()
        statuses = []
        # one status per node (its primary record), a TierUsage per region
        records = [r for r in self.nodes.by_index.values() if r.primary is None] + [
            r for r in self.nodes.departed.values() if r.node_id not in self.nodes.by_id
        ]
        for r in sorted(records, key=lambda rec: rec.node_id):
            alive = r.alive and self.nodes.by_index.get(r.index) is r
            usage = [
                pb.TierUsage(
                    tier=region.tier,
                    capacity_bytes=region.allocator.capacity,
                    allocated_bytes=region.allocator.allocated_bytes if alive else 0,
                    quarantined_bytes=region.allocator.quarantined_bytes if alive else 0,
                    pages=int(pages[region.index]) if alive else 0,
                    hits=region.hits,
                    lookups=region.lookups,
                    evictions=region.evictions,
                    demotions=region.demotions,
                    promotions=region.promotions,
                    segments=int(segments[region.index]) if alive else 0,
                    draining=region.draining,
                )
                for region in (r.regions or [r])
            ]
            statuses.append(
                pb.NodeStatus(
                    node_id=r.node_id,
                    host_id=r.host_id,
                    control_address=r.control_address,
                    data_address=r.data_address,
                    alive=alive,
                    last_heartbeat_age_s=max(0.0, now - r.last_heartbeat),
                    tiers=usage,
                )
            )
        return statuses

    def cluster_stats(self) -> pb.ClusterStatsResponse:
        index = self.index
        high = index.high
        complete = index.state[:high] == COMPLETE
        per_ns = np.bincount(index.ns[:high][complete].astype(np.int64), minlength=MAX_NAMESPACES)
        usage = [
            pb.NamespaceUsage(name=ns.name, pages=int(per_ns[ns.ns_id]), bytes=ns.allocated_bytes)
            for ns in sorted(self.namespaces.values(), key=lambda n: n.name)
        ]
        return pb.ClusterStatsResponse(
            nodes=self.node_statuses(),
            namespaces=usage,
            active_read_leases=len(self.leases),
            open_put_sessions=self.sessions.open_count,
            pages=int(np.count_nonzero(complete)),
            hits=self.hits,
            lookups=self.lookups,
        )

    async def admin_evict(
        self,
        namespace: str,
        everything: bool,
        packed_keys: bytes = b"",
        node_id: str = "",
        tier: str = "",
    ) -> tuple[int, int]:
        """Evict every page in scope not held by a read lease, a live writer or a warm-up.

        Scopes (tiers), combined: a namespace; a prefix (``packed_keys``, with its
        namespace: those pages and every page extending them); a node; a tier.
        """
        if not (namespace or packed_keys or node_id or tier or everything):
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                "name a namespace, a prefix, a node or a tier, or pass all=true to evict everything",
            )
        if packed_keys and not namespace:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "a prefix to evict needs its namespace")
        if tier and tier not in TIERS:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"tier must be one of {TIERS}, got {tier!r}")
        index = self.index
        high = index.high
        scope = (index.state[:high] == COMPLETE) | (index.state[:high] == PENDING)
        if namespace:
            ns = await self.namespace(namespace)
            scope &= index.ns[:high] == ns.ns_id
            if packed_keys:
                scope &= self._descendants(ns, packed_keys)
        if node_id:
            record = self.nodes.get(node_id)
            if record is None:
                raise KVStoreError(ErrorCode.NODE_NOT_FOUND, f"node {node_id!r} is not registered")
            scope &= np.isin(index.node[:high], np.array([r.index for r in record.regions], dtype=np.uint16))
        if tier:
            scope &= self.nodes.tier_code[index.node[:high]] == TIER_CODE[tier]
        rows = np.flatnonzero(scope)
        held = index.lease_count[rows] > 0
        pending_rows = rows[index.state[rows] == PENDING]
        writing = np.zeros(len(rows), dtype=bool)
        if len(pending_rows):
            for ns_id in np.unique(index.ns[pending_rows]).tolist():
                table = index.pending.get(ns_id)
                sel = (index.state[rows] == PENDING) & (index.ns[rows] == ns_id)
                if table is not None:
                    writing[sel] = table.writers[index.pend[rows[sel]]] > 0
        # pages on warming nodes may be read under the previous leader's leases: they count as leased
        # tiers: a live pin holds too (it is bounded: it runs out by itself)
        pinned = index.pin_until[rows] > self.clock()
        skipped = held | writing | pinned | np.isin(rows, self._warming_rows())
        self.check_leading()
        evicted = await self._free_in_chunks(rows[~skipped], evicted=True)
        return evicted, int(np.count_nonzero(skipped))

    def _descendants(self, ns: Namespace, packed_keys: bytes) -> np.ndarray:
        """Mask over index rows: the pages of a prefix that are stored, and every page extending them."""
        index = self.index
        high = index.high
        found = index.lookup(ns.ns_id, packed_keys)
        mask = np.zeros(high, dtype=bool)
        frontier = found[found >= 0]
        while len(frontier):
            mask[frontier] = True
            # children of the frontier (a chain is walked level by level, each level one numpy pass)
            children = np.flatnonzero(np.isin(index.parent[:high], frontier) & (index.state[:high] != FREE))
            frontier = children[~mask[children]]
        return mask

    # ------------------------------------------------------------------ background
    def sweep(self) -> None:
        """One pass of the periodic work; each part touches only what is due or a bounded batch."""
        if not self.leading():
            return  # a deposed leader frees and evicts nothing; it is being stopped
        now = self.clock()
        for unpinned in self.leases.expire(now):
            self._free_doomed(unpinned)
        for abandoned in self.sessions.expire(now):
            if len(abandoned):
                log.info("reclaiming %d pages of an expired put session", len(abandoned))
                self._free_rows(self._doom_leased(abandoned))
        for record in list(self.nodes.by_index.values()):
            record.allocator.reclaim(now)
        for record in self.nodes.overdue(now):
            log.warning(
                "node %s silent for %.1f s: declaring it dead", record.node_id, now - record.last_heartbeat
            )
            self._drop_node(record)
        self._watermark_eviction()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must survive a bug in one pass
                log.exception("sweep failed")
