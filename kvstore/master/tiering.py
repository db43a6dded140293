"""Tier policy and tier moves of the master (DESIGN.md, "Tiers and eviction").

A node owns up to three regions (VRAM, DRAM, NVMe); the master sees each as a
:class:`~kvstore.master.nodes.NodeRecord` of its own, so the page index's node
column names a region.  Puts and one-sided reads use DRAM regions only; NVMe
pages are never handed to a client.

* **Watermarks** (per tier, cluster config): a region past its high watermark
  demotes (VRAM -> DRAM -> NVMe of the same node) while the lower region has
  room, and evicts otherwise, until it is under its low watermark, one bounded
  batch per region per sweep tick (``tier_move_batch`` pages, one node RPC).
* **Moves** are copies the node makes on the master's order
  (``Node.MoveSlots``; ``Node.PullSlots`` between nodes), verified by
  checksum, then an atomic switch of the row's placement here.  A move holds
  its rows like a lease (``lease_count``): nothing evicts, moves or frees them
  meanwhile, and a namespace deleted under it dooms them.  Nothing under a read
  lease is moved: candidates have no lease, and a row that gained one during the
  copy keeps its old slot (the copy is freed), so every lease reads the bytes
  it was granted.
* **Promotion on hit**: AcquirePrefix promotes the NVMe pages of a matched
  prefix to the DRAM of their node before it leases them; where there is no
  room (or ``promote_on_hit`` is off) the hit ends at the first NVMe page.
* **Drain**: every page of a node moves to the other nodes' DRAM, then the
  node is unregistered (and its incarnation refused from then on).

Which pages move is the policy's choice (:class:`TierPolicy`, made by
:func:`make_policy`); eviction order stays with
:mod:`kvstore.master.eviction`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvstore import grants
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.master.index import COMPLETE, DOOMED, FREE, PageIndex
from kvstore.master.nodes import TIER_CODE, NodeRecord

if TYPE_CHECKING:
    from kvstore.master.core import Master

log = logging.getLogger("kvstore.master.tiering")

NVME = TIER_CODE["nvme"]
MOVE_TIMEOUT_S = 120.0  # one batched move RPC (a few hundred MiB through a disk)
DRAIN_IDLE_S = 0.1  # a drain round that moved nothing waits this long
DRAIN_NO_ROOM_ROUNDS = 20  # rounds in a row without room anywhere before pages count as unplaced
# tier above -> the tier its pages are demoted to on the same node
LOWER = {"vram": "dram", "dram": "nvme"}


class TierPolicy(abc.ABC):
    """Chooses which pages of a region a demotion moves."""

    @abc.abstractmethod
    def demotion_candidates(
        self,
        index: PageIndex,
        region: int,
        need_bytes: int,
        now: float,
        max_rows: int,
        exclude: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows of ``region`` to demote (at most ``max_rows``) towards ``need_bytes``.

        Only complete pages with no lease (nor a move holding them), no live pin,
        and not among ``exclude`` (the prefix being read).
        """


class LruDemotion(TierPolicy):
    """Least recently used complete pages first (recency as matching and reads update it)."""

    def demotion_candidates(
        self,
        index: PageIndex,
        region: int,
        need_bytes: int,
        now: float,
        max_rows: int,
        exclude: np.ndarray | None = None,
    ) -> np.ndarray:
        high = index.high
        if need_bytes <= 0 or max_rows <= 0 or high == 0:
            return np.zeros(0, dtype=np.int64)
        mask = (
            (index.node[:high] == region)
            & (index.state[:high] == COMPLETE)
            & (index.lease_count[:high] == 0)
            & (index.pin_until[:high] <= now)
        )
        if exclude is not None and len(exclude):
            mask[exclude[(exclude >= 0) & (exclude < high)]] = False
        rows = np.flatnonzero(mask)
        if not len(rows):
            return rows.astype(np.int64)
        access = index.last_access[rows]
        if len(rows) > max_rows:
            part = np.argpartition(access, max_rows - 1)[:max_rows]
            rows, access = rows[part], access[part]
        rows = rows[np.argsort(access, kind="stable")]
        covered = np.cumsum(index.row_bytes(rows).astype(np.int64))
        cut = min(int(np.searchsorted(covered, need_bytes, side="left")) + 1, len(rows))
        return rows[:cut].astype(np.int64)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False  # a test driving the master synchronously: evict instead of moving
    return True


def make_policy(name: str) -> TierPolicy:
    """The tier policy named by the ``tier_policy`` setting."""
    policies: dict[str, type[TierPolicy]] = {"lru": LruDemotion}
    cls = policies.get(name.strip().lower())
    if cls is None:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT, f"unknown tier_policy {name!r} (known: {', '.join(sorted(policies))})"
        )
    return cls()


@dataclass
class DrainProgress:
    node_id: str
    incarnation: bytes
    state: str = "running"
    pages_total: int = 0
    pages_moved: int = 0
    pages_left: int = 0
    pages_unplaced: int = 0
    message: str = ""
    force: bool = False
    cancelled: bool = False

    def response(self) -> pb.DrainNodeResponse:
        return pb.DrainNodeResponse(
            state=self.state,
            pages_total=self.pages_total,
            pages_moved=self.pages_moved,
            pages_left=self.pages_left,
            pages_unplaced=self.pages_unplaced,
            message=self.message,
        )


class Tiering:
    """The master's tier work: watermark ticks, moves, promotion on hit, drains."""

    def __init__(self, master: Master) -> None:
        self.master = master
        cfg = master.cfg
        self.policy = make_policy(cfg.tier_policy)
        self.batch = max(1, int(cfg.tier_move_batch))
        self.watermarks = {
            "dram": (cfg.high_watermark, cfg.low_watermark),
            "vram": (cfg.vram_high_watermark, cfg.vram_low_watermark),
            "nvme": (cfg.nvme_high_watermark, cfg.nvme_low_watermark),
        }
        self._in_flight: dict[int, tuple[int, asyncio.Future[None]]] = {}  # row -> (epoch, done)
        self._busy: dict[int, asyncio.Task[None]] = {}  # region index -> its demotion task
        self._lowering: set[int] = set()  # regions that went past high and are not under low yet
        self.drains: dict[str, DrainProgress] = {}
        self._drain_tasks: dict[str, asyncio.Task[None]] = {}
        self.drained: set[tuple[str, bytes]] = set()  # (node id, incarnation) unregistered by a drain
        self.move_seconds = 0.0
        self.bytes_demoted = 0
        self.pages_demoted = 0
        self.pages_promoted = 0

    # ------------------------------------------------------------------ helpers
    def lower_region(self, record: NodeRecord) -> NodeRecord | None:
        """The region of the same node that ``record``'s pages are demoted to, if any."""
        want = LOWER.get(record.tier)
        primary = record.primary or record
        for region in primary.regions:
            if region.tier == want and region.alive:
                return region
        return None

    def dram_of(self, record: NodeRecord) -> NodeRecord:
        return record.primary or record

    def vram_regions(self, primaries: list[NodeRecord]) -> list[NodeRecord]:
        """vram: the VRAM regions of these nodes (in their order) that take puts now.

        A region takes puts while it is below its high watermark; a put may carry it past
        (up to what fits), and the watermark tick then demotes its least recently used
        pages to DRAM down to the low watermark, so VRAM keeps the newest pages.
        """
        high, _ = self.watermarks["vram"]
        now = self.master.clock()
        found: list[NodeRecord] = []
        for primary in primaries:
            for region in primary.regions:
                if region.tier != "vram" or not region.alive or not region.ready or region.draining:
                    continue
                if region.warm_until > now or self.master.notifier.failing(region.index):
                    continue
                if region.allocator.used_fraction < high and region.allocator.free_bytes > 0:
                    found.append(region)
        return found

    def _registered(self, record: NodeRecord) -> bool:
        return self.master.nodes.by_index.get(record.index) is record and record.alive

    def needs_promotion(self, rows: np.ndarray) -> bool:
        return bool(len(rows)) and bool(
            np.any(self.master.nodes.tier_code[self.master.index.node[rows]] == NVME)
        )

    def readable_prefix(self, rows: np.ndarray, matched: int) -> int:
        """Leading pages of ``rows[:matched]`` a client may read (none on NVMe)."""
        if matched == 0:
            return 0
        on_nvme = self.master.nodes.tier_code[self.master.index.node[rows[:matched]]] == NVME
        return int(np.argmax(on_nvme)) if on_nvme.any() else matched

    def check_registration(self, node_id: str, incarnation: bytes) -> None:
        if (node_id, incarnation) in self.drained:
            raise KVStoreError(
                ErrorCode.NODE_DRAINED,
                f"node {node_id} was drained and unregistered; restart it to rejoin with a new incarnation",
            )

    # ------------------------------------------------------------------ watermark tick
    def tick(self) -> None:
        """Background (every sweep): each region past its high watermark demotes or evicts one batch."""
        master = self.master
        now = master.clock()
        for record in list(master.nodes.by_index.values()):
            if not record.alive or record.warm_until > now or record.index in self._busy or record.draining:
                continue  # (a draining node's pages leave by the drain, not by demotion or eviction)
            high, low = self.watermarks.get(record.tier, self.watermarks["dram"])
            allocator = record.allocator
            # past high, a region keeps going (batch by batch, tick by tick) until it is under low
            if allocator.used_fraction <= high and record.index not in self._lowering:
                continue
            # quarantined bytes come back by themselves: only what is allocated needs to go
            need = allocator.allocated_bytes - int(low * allocator.capacity)
            if need <= 0:
                self._lowering.discard(record.index)
                continue
            self._lowering.add(record.index)
            lower = self.lower_region(record)
            if lower is not None and not lower.draining and self._has_room(lower):
                rows = self.policy.demotion_candidates(master.index, record.index, need, now, self.batch)
                if len(rows) and _loop_running():
                    task = asyncio.get_running_loop().create_task(
                        self._demote(record, lower, rows),
                        name=f"kvstore-demote-{record.node_id}-{record.tier}",
                    )
                    self._busy[record.index] = task
                    task.add_done_callback(self._forget_busy(record.index))
                    continue
            if master.evict(need, node=record.index, passes=2) == 0:
                self._lowering.discard(record.index)  # nothing evictable now: wait for high again

    def _forget_busy(self, region: int) -> Callable[[asyncio.Task[None]], None]:
        def forget(task: asyncio.Task[None]) -> None:
            if self._busy.get(region) is task:
                del self._busy[region]

        return forget

    def _has_room(self, record: NodeRecord) -> bool:
        high, _ = self.watermarks.get(record.tier, self.watermarks["dram"])
        return record.allocator.used_fraction < high and record.allocator.free_bytes > 0

    async def _demote(self, src: NodeRecord, dst: NodeRecord, rows: np.ndarray) -> None:
        try:
            moved = await self.transfer(src, dst, rows)
            if moved == 0:
                # the lower region had no slot for these (full of other sizes): evict instead this time
                high, low = self.watermarks.get(src.tier, self.watermarks["dram"])
                need = src.allocator.allocated_bytes - int(low * src.allocator.capacity)
                if need > 0 and self._registered(src):
                    self.master.evict(need, node=src.index, passes=1)
        except Exception:  # noqa: BLE001 - a failed batch is retried by a later tick
            log.exception("demotion from %s/%s failed", src.node_id, src.tier)

    async def stop(self) -> None:
        tasks = list(self._busy.values()) + list(self._drain_tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ moves
    async def transfer(self, src: NodeRecord, dst: NodeRecord, rows: np.ndarray) -> int:
        """Move complete, unleased pages ``rows`` from region ``src`` to region ``dst``; returns pages moved.

        Same node: one MoveSlots.  Other node: DescribeSlots on the source, then
        PullSlots on the destination with a READ grant for the source slots.
        """
        master = self.master
        index = master.index
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        rows = rows[
            (index.state[rows] == COMPLETE) & (index.node[rows] == src.index) & (index.lease_count[rows] == 0)
        ]
        if not len(rows) or not self._registered(src) or not self._registered(dst):
            return 0
        now = master.clock()
        if src.warm_until > now or dst.warm_until > now:
            return 0  # a new leader neither allocates nor frees on adopted regions during its warm-up
        epochs = index.epoch[rows].copy()
        index.lease_count[rows] += np.uint32(1)  # held by this move
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for row, epoch in zip(rows.tolist(), epochs.tolist(), strict=True):
            self._in_flight[row] = (epoch, done)
        started = time.monotonic()
        moved = 0
        try:
            moved = await self._transfer_held(src, dst, rows, epochs)
        finally:
            still = index.epoch[rows] == epochs
            held = rows[still]
            index.lease_count[held] -= np.uint32(1)
            for row in rows.tolist():
                entry = self._in_flight.get(row)
                if entry is not None and entry[1] is done:
                    del self._in_flight[row]
            done.set_result(None)
            released = held[(index.lease_count[held] == 0) & (index.state[held] == DOOMED)]
            if len(released):
                master._free_rows(released)
            self.move_seconds += time.monotonic() - started
        return moved

    async def _transfer_held(
        self, src: NodeRecord, dst: NodeRecord, rows: np.ndarray, epochs: np.ndarray
    ) -> int:
        master = self.master
        index = master.index
        sizes = index.row_bytes(rows).astype(np.int64)
        dst_slots = np.zeros(len(rows), dtype=np.uint64)
        dst_gens = np.zeros(len(rows), dtype=np.uint32)
        got = np.zeros(len(rows), dtype=bool)
        for size in np.unique(sizes).tolist():
            sel = np.flatnonzero(sizes == size)
            slots, gens = dst.allocator.allocate(int(size), len(sel))
            n = len(slots)
            dst_slots[sel[:n]], dst_gens[sel[:n]], got[sel[:n]] = slots, gens, True
        rows, epochs, sizes = rows[got], epochs[got], sizes[got]
        dst_slots, dst_gens = dst_slots[got], dst_gens[got]
        if not len(rows):
            return 0
        src_slots = index.slot[rows].copy()
        src_gens = index.generation[rows].copy()
        ok = np.zeros(len(rows), dtype=bool)
        try:
            # Everything queued for these regions first: a free of a destination slot still in the
            # queue must not land after the copy, and the source's commits must be there to copy.
            await asyncio.gather(master.notifier.flush(src.index), master.notifier.flush(dst.index))
            master.check_leading()
            ok = await self._copy(src, dst, src_slots, src_gens, dst_slots, dst_gens)
        except Exception as exc:  # noqa: BLE001 - any failure: nothing switches, the copies are freed
            log.warning(
                "move of %d pages %s/%s -> %s/%s failed: %s",
                len(rows),
                src.node_id,
                src.tier,
                dst.node_id,
                dst.tier,
                exc,
            )
        # -- the atomic switch (no await from here on)
        switch = (
            ok
            & (index.epoch[rows] == epochs)
            & (index.state[rows] == COMPLETE)
            & (index.node[rows] == src.index)
            & (index.lease_count[rows] == 1)  # only this move: a lease taken meanwhile keeps the old slot
            & self._registered(src)
            & self._registered(dst)
        )
        if self._registered(dst) and not switch.all():
            lost = ~switch
            gens = dst.allocator.free(dst_slots[lost], 0.0)  # nobody was ever granted these
            master.notifier.enqueue_free(dst.index, dst_slots[lost], gens)
        moved_rows = rows[switch]
        if not len(moved_rows):
            return 0
        if self._registered(src):
            gens = src.allocator.free(src_slots[switch], master.cfg.evicted_quarantine_ms / 1000.0)
            master.notifier.enqueue_free(src.index, src_slots[switch], gens)
        index.node[moved_rows] = dst.index
        index.slot[moved_rows] = dst_slots[switch]
        index.generation[moved_rows] = dst_gens[switch]
        count = len(moved_rows)
        demotion = LOWER.get(src.tier) == dst.tier and src.node_id == dst.node_id
        promotion = LOWER.get(dst.tier) == src.tier and src.node_id == dst.node_id
        if demotion:
            src.demotions += count
            self.pages_demoted += count
            self.bytes_demoted += int(sizes[switch].sum())
        elif promotion:
            dst.promotions += count
            self.pages_promoted += count
        return count

    async def _copy(
        self,
        src: NodeRecord,
        dst: NodeRecord,
        src_slots: np.ndarray,
        src_gens: np.ndarray,
        dst_slots: np.ndarray,
        dst_gens: np.ndarray,
    ) -> np.ndarray:
        master = self.master
        nodes = master.nodes
        if (src.primary or src) is (dst.primary or dst):
            response = await nodes.stub(src).MoveSlots(
                pb.MoveSlotsRequest(
                    term=master.term,
                    src_tier=src.tier,
                    dst_tier=dst.tier,
                    src_slots=src_slots.astype("<u8").tobytes(),
                    src_generations=src_gens.astype("<u4").tobytes(),
                    dst_slots=dst_slots.astype("<u8").tobytes(),
                    dst_generations=dst_gens.astype("<u4").tobytes(),
                ),
                timeout=MOVE_TIMEOUT_S,
            )
        else:
            if src.tier != "dram":
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "pages move between nodes from DRAM only")
            records = await nodes.stub(src).DescribeSlots(
                pb.DescribeSlotsRequest(tier=src.tier, slots=src_slots.astype("<u8").tobytes()),
                timeout=nodes.rpc_timeout_s,
            )
            expires_ms = int((time.time() + MOVE_TIMEOUT_S) * 1000)
            grant = grants.sign(
                master.grant_secret,
                src.node_id,
                src.incarnation,
                src_slots,
                src_gens,
                expires_ms,
                master.term,
                grants.READ,
            )
            response = await nodes.stub(dst).PullSlots(
                pb.PullSlotsRequest(
                    term=master.term,
                    source=src.ref,
                    grant=grant,
                    src_slots=src_slots.astype("<u8").tobytes(),
                    dst_tier=dst.tier,
                    dst_slots=dst_slots.astype("<u8").tobytes(),
                    dst_generations=dst_gens.astype("<u4").tobytes(),
                    records=records,
                ),
                timeout=MOVE_TIMEOUT_S,
            )
        ok = np.frombuffer(response.ok, dtype=np.uint8)
        if len(ok) != len(src_slots):
            raise KVStoreError(
                ErrorCode.INTERNAL, f"move answered {len(ok)} results for {len(src_slots)} slots"
            )
        if not ok.all():
            log.warning(
                "%d of %d slots not moved %s/%s -> %s/%s: %s",
                int(np.count_nonzero(ok == 0)),
                len(ok),
                src.node_id,
                src.tier,
                dst.node_id,
                dst.tier,
                response.message,
            )
        return ok.astype(bool)

    # ------------------------------------------------------------------ promotion on hit
    async def promote_for_read(self, rows: np.ndarray) -> None:
        """Promote the NVMe pages among ``rows`` (a matched prefix) to the DRAM of their node.

        Pages already being moved are waited for.  Returns when every move has
        finished; the caller matches again and cuts the hit at the first page
        still on NVMe.
        """
        master = self.master
        if not master.cfg.promote_on_hit or not len(rows):
            return
        index = master.index
        on_nvme = rows[master.nodes.tier_code[index.node[rows]] == NVME]
        if not len(on_nvme):
            return
        waits: list[asyncio.Future[None]] = []
        fresh: list[int] = []
        for row in on_nvme.tolist():
            entry = self._in_flight.get(row)
            if entry is not None and entry[0] == int(index.epoch[row]):
                waits.append(entry[1])
            else:
                fresh.append(row)
        jobs: list[asyncio.Future[object]] = [asyncio.ensure_future(asyncio.shield(w)) for w in set(waits)]
        if fresh:
            fresh_rows = np.array(fresh, dtype=np.int64)
            node_of = index.node[fresh_rows]
            for node in np.unique(node_of).tolist():
                src = master.nodes.by_index.get(node)
                if src is None:
                    continue
                jobs.append(asyncio.ensure_future(self._promote(src, fresh_rows[node_of == node], rows)))
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)

    async def _promote(self, src: NodeRecord, rows: np.ndarray, reading: np.ndarray) -> int:
        """NVMe rows -> their node's DRAM, first demoting as many LRU DRAM pages when DRAM is full.

        The swap keeps a hit whole while the lower tier has room; the watermark
        tick alone would cut hits short whenever reads outrun it.
        """
        master = self.master
        dst = self.dram_of(src)
        need = int(master.index.row_bytes(rows).sum()) - dst.allocator.free_bytes
        if need > 0 and not dst.draining:
            victims = self.policy.demotion_candidates(
                master.index, dst.index, need, master.clock(), len(rows) + 16, exclude=reading
            )
            if len(victims) and self._has_room(src):
                await self.transfer(dst, src, victims)
        return await self.transfer(src, dst, rows)

    # ------------------------------------------------------------------ drain
    async def drain(
        self, node_id: str, force: bool = False, cancel: bool = False, status_only: bool = False
    ) -> pb.DrainNodeResponse:
        """Start (or report on, or cancel) the drain of ``node_id``.

        A drain in progress, or one that finished (the node is gone), is
        reported; a failed or cancelled one is started again unless
        ``status_only``.
        """
        master = self.master
        progress = self.drains.get(node_id)
        task = self._drain_tasks.get(node_id)
        running = task is not None and not task.done()
        if cancel:
            if progress is None or not running:
                raise KVStoreError(ErrorCode.NODE_NOT_FOUND, f"no drain of node {node_id} is running")
            progress.cancelled = True
            return progress.response()
        if progress is not None and (running or status_only or progress.state == "done"):
            if running:
                progress.force = progress.force or force
            return progress.response()
        if status_only:
            raise KVStoreError(ErrorCode.NODE_NOT_FOUND, f"node {node_id} has not been drained")
        record = master.nodes.get(node_id)
        if record is None or not record.alive:
            raise KVStoreError(ErrorCode.NODE_NOT_FOUND, f"node {node_id} is not registered")
        master.check_leading()
        progress = DrainProgress(node_id=node_id, incarnation=record.incarnation, force=force)
        progress.pages_total = progress.pages_left = len(self._rows_on(record))
        self.drains[node_id] = progress
        for region in record.regions:
            region.draining = True
        task = asyncio.get_running_loop().create_task(
            self._drain(record, progress), name=f"kvstore-drain-{node_id}"
        )
        self._drain_tasks[node_id] = task
        log.info("draining node %s: %d pages", node_id, progress.pages_total)
        return progress.response()

    def _rows_on(self, record: NodeRecord) -> np.ndarray:
        index = self.master.index
        high = index.high
        regions = np.array([r.index for r in record.regions], dtype=np.uint16)
        return np.flatnonzero(np.isin(index.node[:high], regions) & (index.state[:high] != FREE))

    async def _drain(self, record: NodeRecord, progress: DrainProgress) -> None:
        master = self.master
        try:
            await self._drain_rounds(record, progress)
        except asyncio.CancelledError:
            progress.state, progress.message = "cancelled", "the master stopped"
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            log.exception("drain of %s failed", record.node_id)
            progress.state, progress.message = "failed", str(exc)
        if progress.state == "running":
            left = len(self._rows_on(record)) if self._registered(record) else 0
            progress.pages_left = left
            if progress.cancelled:
                progress.state, progress.message = "cancelled", "cancelled; the node takes new pages again"
            elif left and not progress.force:
                progress.state = "failed"
                progress.message = (
                    f"{left} pages could not move ({progress.pages_unplaced} found no room elsewhere); "
                    "make room or drain with --force to drop them"
                )
            else:
                if self._registered(record):
                    master.check_leading()
                    self.drained.add((record.node_id, record.incarnation))
                    master._drop_node(record)
                progress.state = "done"
                progress.message = f"moved {progress.pages_moved} pages" + (
                    f", dropped {left}" if left else ""
                )
        if progress.state != "done" and self._registered(record):
            for region in record.regions:
                region.draining = False
        log.info("drain of %s: %s (%s)", record.node_id, progress.state, progress.message)

    async def _drain_rounds(self, record: NodeRecord, progress: DrainProgress) -> None:
        master = self.master
        index = master.index
        deadline = master.clock() + max(master.cfg.read_lease_ms, master.cfg.write_lease_ms) / 1000.0 * 2 + 10
        no_room = 0
        while not progress.cancelled and self._registered(record):
            rows = self._rows_on(record)
            progress.pages_left = len(rows)
            if not len(rows):
                return
            movable = rows[(index.state[rows] == COMPLETE) & (index.lease_count[rows] == 0)]
            on_dram = movable[index.node[movable] == record.index]
            on_lower = movable[index.node[movable] != record.index]
            moved = 0
            room = False
            if len(on_dram):
                batch = on_dram[: self.batch]
                for dst in self._drain_targets(record):
                    moved_now = await self.transfer(record, dst, batch)
                    moved += moved_now
                    room = room or moved_now > 0
                    batch = batch[index.node[batch] == record.index]
                    if not len(batch):
                        break
                progress.pages_moved += moved
            if len(on_lower) and record.allocator.free_bytes > 0:
                # NVMe (or VRAM) pages go through this node's DRAM, which the moves above empty
                lower = on_lower[: self.batch]
                for node in np.unique(index.node[lower]).tolist():
                    src = master.nodes.by_index.get(node)
                    if src is not None:
                        got = await self.transfer(src, record, lower[index.node[lower] == node])
                        room = room or got > 0
            if moved or room:
                no_room = 0
                continue
            if len(on_dram) and not self._drain_targets(record, with_room=True):
                no_room += 1
                if no_room >= DRAIN_NO_ROOM_ROUNDS:
                    progress.pages_unplaced = len(movable)
                    return
            if master.clock() > deadline:
                return  # leases or writers that outlast every default lease: reported as left
            await asyncio.sleep(DRAIN_IDLE_S)

    def _drain_targets(self, record: NodeRecord, with_room: bool = False) -> list[NodeRecord]:
        """Other nodes' DRAM regions, most free first."""
        now = self.master.clock()
        targets = [
            r
            for r in self.master.nodes.by_index.values()
            if r.primary is None
            and r is not record
            and r.alive
            and r.ready
            and not r.draining
            and r.warm_until <= now
            and (not with_room or r.allocator.free_bytes > 0)
        ]
        return sorted(targets, key=lambda r: -r.allocator.free_bytes)
