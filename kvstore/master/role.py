"""A master process's role: standby or leader, and the moves between them.

:class:`MasterRole` campaigns through the metadata backend.  While it waits it
is a standby: every KVStore and NodeRegistry call is answered NOT_LEADER
naming the leader (message and ``kvstore-leader`` trailing metadata), and Admin
ListNodes shows the leader and the registered nodes.  When it wins, it builds a
fresh :class:`kvstore.master.core.Master` for that term, rebuilds the object
index from the inventories of every registered node *before* it serves
anything, then serves and follows the node registrations.  When the
leadership is lost (``wait_lost``: the lease could not be renewed in time, or a
fenced write found a successor) it stops that Master (its index, sessions,
leases and background loops go with it) and campaigns again.  State never
outlives a term, so a deposed leader has nothing left to act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kvstore._proto import kvstore_pb2 as pb
from kvstore.config import Config
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.master.core import Master
from kvstore.metadata.base import Leadership, MetadataBackend

log = logging.getLogger("kvstore.master.role")

LEADER_HINT_TTL_S = 0.2  # how long a standby trusts its last look at who leads
LEADER_HINT_TIMEOUT_S = 1.0  # a standby's look at who leads; past it, callers hear UNAVAILABLE
REBUILD_RETRY_MS = 100  # what a leader still rebuilding tells callers to wait
CAMPAIGN_RETRY_S = (0.1, 2.0)  # pause after a failed campaign or rebuild, growing to the second


class MasterRole:
    """Who serves the RPCs: the current term's Master while leading, NOT_LEADER answers otherwise."""

    def __init__(
        self,
        cfg: Config,
        metadata: MetadataBackend,
        master_factory: Callable[[], Master] | None = None,
    ) -> None:
        self.cfg = cfg
        self.metadata = metadata
        self._factory = master_factory or (lambda: Master(cfg, metadata))
        self.address = ""
        self._current: Master | None = None  # leading and done rebuilding
        self._rebuilding: Master | None = None
        self._task: asyncio.Task[None] | None = None
        self._led = asyncio.Event()
        self._hint: tuple[float, Leadership | None] = (float("-inf"), None)
        self.terms_led = 0

    @classmethod
    def fixed(cls, master: Master) -> MasterRole:
        """A role that always serves ``master`` (already started): tests and embedders driving a Master."""
        role = cls(master.cfg, master.metadata, lambda: master)
        role._current = master
        role.address = master.leadership.leader_address
        return role

    # ------------------------------------------------------------------ life cycle
    async def start(self, address: str, wait_for_leadership: bool = False) -> None:
        """Begin campaigning (serving as a standby meanwhile); optionally wait until this master leads."""
        self.address = address
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvstore-master-role")
        if wait_for_leadership:
            led = asyncio.ensure_future(self._led.wait())
            done, _ = await asyncio.wait({led, self._task}, return_when=asyncio.FIRST_COMPLETED)
            if self._task in done:
                led.cancel()
                self._task.result()  # a campaign that failed for good: raise its error

    async def stop(self) -> None:
        """Stop campaigning or leading; a leader resigns so a standby takes over at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(KVStoreError):
            await self.metadata.resign()

    async def _run(self) -> None:
        delay = CAMPAIGN_RETRY_S[0]
        while True:
            try:
                leadership = await self.metadata.campaign(self.address)
            except KVStoreError as exc:
                log.warning("campaign failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, CAMPAIGN_RETRY_S[1])
                continue
            try:
                reason = await self._lead(leadership)
                delay = CAMPAIGN_RETRY_S[0]
            except KVStoreError as exc:
                reason = f"could not take up the leadership: {exc}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, CAMPAIGN_RETRY_S[1])
            log.warning("stepped down from term %d: %s; campaigning again", leadership.term, reason)

    async def _lead(self, leadership: Leadership) -> str:
        """Lead one term: rebuild, serve, follow registrations, until the leadership is lost."""
        master = self._factory()
        watcher: asyncio.Task[None] | None = None
        lost = asyncio.ensure_future(self.metadata.wait_lost(leadership))
        try:
            self._rebuilding = master
            started = time.monotonic()
            await master.lead(leadership)
            adopted = await master.adopt_registered_nodes()
            if lost.done():
                return lost.result()
            self._rebuilding, self._current = None, master
            self.terms_led += 1
            self._led.set()
            log.log(
                logging.WARNING if leadership.term > 1 else logging.INFO,  # a failover is worth a line
                "leading as %s with term %d: index rebuilt from %d node(s), %d pages, in %.0f ms",
                self.address,
                leadership.term,
                adopted,
                len(master.index),
                (time.monotonic() - started) * 1000,
            )
            watcher = asyncio.get_running_loop().create_task(
                self._follow(master), name="kvstore-node-registrations"
            )
            return await lost
        finally:
            self._current = self._rebuilding = None
            lost.cancel()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await master.stop()

    async def _follow(self, master: Master) -> None:
        delay = CAMPAIGN_RETRY_S[0]
        while True:
            try:
                await master.follow_registrations()
            except KVStoreError as exc:
                log.warning("node registration watch failed (%s); restarting it", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, CAMPAIGN_RETRY_S[1])

    # ------------------------------------------------------------------ serving
    @property
    def current(self) -> Master | None:
        """The Master of the term this process leads (and has rebuilt), or None."""
        master = self._current
        return master if master is not None and master.leading() else None

    async def master(self) -> Master:
        """The leading Master; otherwise NOT_LEADER naming the leader (or UNAVAILABLE while rebuilding)."""
        master = self.current
        if master is not None:
            return master
        if self._rebuilding is not None and self._rebuilding.leading():
            raise KVStoreError(
                ErrorCode.UNAVAILABLE,
                "this master just became the leader and is rebuilding its index from the nodes; retry shortly",
                retry_after_ms=REBUILD_RETRY_MS,
            )
        try:
            leader = await self.leadership_hint()
        except KVStoreError as exc:
            # Still a clear "not here": callers move on to another master (which may know more).
            raise KVStoreError(
                ErrorCode.NOT_LEADER, f"{self.address or 'this master'} is not leading ({exc.message})"
            ) from exc
        if leader is None:
            raise KVStoreError(
                ErrorCode.NOT_LEADER, f"{self.address or 'this master'} is a standby; no leader now"
            )
        if leader.leader_address == self.address:
            # etcd still names this process, whose leadership just ended: its successor is not known yet
            raise KVStoreError(
                ErrorCode.NOT_LEADER,
                f"{self.address}'s leadership (term {leader.term}) has ended; no leader now",
            )
        return self._raise_not_leader(leader)

    def _raise_not_leader(self, leader: Leadership) -> Master:
        raise KVStoreError(
            ErrorCode.NOT_LEADER,
            f"{self.address or 'this master'} is a standby; the leader is {leader.leader_address} (term {leader.term})",
            leader=leader.leader_address,
        )

    async def leadership_hint(self) -> Leadership | None:
        """The leader as the metadata backend records it, looked up at most every LEADER_HINT_TTL_S."""
        looked, hint = self._hint
        if time.monotonic() - looked < LEADER_HINT_TTL_S:
            return hint
        try:
            hint = await asyncio.wait_for(self.metadata.current_leadership(), LEADER_HINT_TIMEOUT_S)
        except (KVStoreError, TimeoutError) as exc:
            raise KVStoreError(
                ErrorCode.UNAVAILABLE,
                f"this master is not leading and cannot reach the metadata store: {exc}",
            ) from exc
        self._hint = (time.monotonic(), hint)
        return hint

    async def list_nodes(self) -> pb.ListNodesResponse:
        """Admin ListNodes on any master: the leader's full view, or a standby's view from the registrations."""
        master = self.current
        if master is not None:
            return pb.ListNodesResponse(
                nodes=master.node_statuses(),
                term=master.term,
                leader_address=master.leadership.leader_address,
            )
        leader = await self.leadership_hint()
        nodes = []
        for node_id, info in sorted((await self.metadata.list_nodes()).items()):
            request = Master._decode_registration(node_id, info)
            if request is None:
                continue
            nodes.append(
                pb.NodeStatus(
                    node_id=node_id,
                    host_id=request.host_id,
                    control_address=request.control_address,
                    data_address=request.data_address,
                    alive=True,  # registered: its lease in the store is alive
                    tiers=[
                        pb.TierUsage(tier=r.tier, capacity_bytes=r.capacity_bytes) for r in request.regions
                    ],
                )
            )
        return pb.ListNodesResponse(
            nodes=nodes,
            term=leader.term if leader else 0,
            leader_address=leader.leader_address if leader else "",
        )
