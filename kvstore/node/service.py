"""The node's gRPC service: slot updates from the master, inventory for a new leader, stats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, grpc_errors
from kvstore.node.data_server import DataStats
from kvstore.node.inventory import KEY_BYTES, Inventory
from kvstore.node.moves import Mover, Region
from kvstore.node.state import NodeState
from kvstore.packed import unpack
from kvstore.tiers.base import Tier

log = logging.getLogger("kvstore.node.service")


def _same_length(what: str, *tables: np.ndarray) -> int:
    lengths = {len(t) for t in tables}
    if len(lengths) > 1:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT, f"{what} tables have different lengths {sorted(lengths)}"
        )
    return lengths.pop()


class NodeService(pb_grpc.NodeServicer):
    """Applies the master's slot updates to the tier's generation table and the inventory."""

    def __init__(
        self,
        state: NodeState,
        tier: Tier,
        inventory: Inventory,
        data_stats: DataStats,
        mover: Mover | None = None,
    ) -> None:
        self._state = state
        self._tier = tier
        self._inventory = inventory
        self._data_stats = data_stats
        # tiers: every region of the node by tier name ("dram" is the pool above)
        self._mover = mover or Mover(state, {tier.tier: Region(tier, inventory)})
        # handler tasks of the open SlotUpdateStream calls (close() ends them)
        self._streams: dict[asyncio.Task[Any], grpc.aio.ServicerContext] = {}

    def _region(self, tier: str) -> tuple[Tier, Inventory]:
        region = self._mover.region(tier)
        return region.tier, region.inventory

    @grpc_errors
    async def ApplySlotUpdates(
        self, request: pb.SlotUpdates, context: grpc.aio.ServicerContext
    ) -> pb.SlotUpdatesResponse:
        return self._apply_slot_updates(request)

    async def SlotUpdateStream(
        self, requests: AsyncIterator[pb.SlotUpdates], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SlotUpdatesResponse]:
        """ApplySlotUpdates over one long-lived stream: each batch applied and answered in order.

        A rejected batch is answered in band (error_code, error_message: what the
        unary call's status and ``kvstore-error`` metadata would say), so the
        stream stays open for the next one.
        """
        task = asyncio.current_task()
        assert task is not None
        self._streams[task] = context
        try:
            async for request in requests:
                try:
                    response = self._apply_slot_updates(request)
                except KVStoreError as exc:
                    response = pb.SlotUpdatesResponse(error_code=exc.code.name, error_message=exc.message)
                except Exception as exc:  # noqa: BLE001 - a bug: answered as grpc_errors answers it
                    log.exception("unhandled error in SlotUpdateStream")
                    response = pb.SlotUpdatesResponse(
                        error_code=ErrorCode.INTERNAL.name, error_message=f"{type(exc).__name__}: {exc}"
                    )
                yield response
        finally:
            self._streams.pop(task, None)

    async def close(self) -> None:
        """End the open slot update streams (UNAVAILABLE to the master, which reopens one when it next sends).

        Call before the gRPC server's graceful stop: a master's stream never ends
        by itself, and the stop would otherwise wait out its whole grace period.
        """
        streams = list(self._streams.items())
        for task, context in streams:
            # abort from here sends the status (ending the call for both sides); the cancel ends the
            # handler, which otherwise keeps waiting for a next batch
            with contextlib.suppress(Exception):  # AbortError, always; UsageError if it just ended
                await context.abort(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE: the node is stopping")
            task.cancel()
        if streams:
            # the handlers have ended before the caller's graceful stop looks for calls in flight
            # (once, under a loaded machine, a stop still waited out its grace: the cancel had
            # not been delivered yet)
            await asyncio.wait([task for task, _ in streams], timeout=1.0)

    def _apply_slot_updates(self, request: pb.SlotUpdates) -> pb.SlotUpdatesResponse:
        """Apply one batch (ApplySlotUpdates and SlotUpdateStream); raises KVStoreError, applying nothing."""
        # Decode and validate the whole batch before touching anything, so a bad batch applies nothing.
        a_slots = unpack(request.assign_slots, "<u8", "assign_slots")
        a_gens = unpack(request.assign_generations, "<u4", "assign_generations")
        a_sizes = unpack(request.assign_slot_bytes, "<u8", "assign_slot_bytes")
        a_ns = unpack(request.assign_ns_index, "<u2", "assign_ns_index")
        n_assign = _same_length("assignment", a_slots, a_gens, a_sizes, a_ns)
        if (
            len(request.assign_keys) != n_assign * KEY_BYTES
            or len(request.assign_parents) != n_assign * KEY_BYTES
        ):
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, "assign_keys/assign_parents must be 16 bytes per slot"
            )
        if n_assign and int(a_ns.max()) >= len(request.namespaces):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "assign_ns_index points past the namespaces table")
        c_slots = unpack(request.commit_slots, "<u8", "commit_slots")
        c_layers = unpack(request.commit_layers, "<u2", "commit_layers")
        c_heads = unpack(request.commit_heads, "<u2", "commit_heads", width=2)
        c_sums = unpack(request.commit_checksums, "<u8", "commit_checksums")
        _same_length("layer commit", c_slots, c_layers, c_heads, c_sums)
        if np.any(c_heads[:, 0] >= c_heads[:, 1]):
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, "commit head ranges must be non-empty (begin < end)"
            )
        f_slots = unpack(request.free_slots, "<u8", "free_slots")
        f_gens = unpack(request.free_generations, "<u4", "free_generations")
        _same_length("free", f_slots, f_gens)
        tier, inventory = self._region(request.tier)
        for what, slots in (("assignment", a_slots), ("commit", c_slots), ("free", f_slots)):
            inventory.check_slots(slots, what)

        self._state.observe_term(request.term)
        namespaces = list(request.namespaces)
        # Assign: record first, then publish the generation, so a writer whose grant
        # matches the new generation always finds the slot's size in the inventory.
        inventory.assign(
            a_slots,
            a_gens,
            request.assign_keys,
            request.assign_parents,
            a_sizes,
            # one namespace per batch is the rule: no Python object per slot for it
            [namespaces[0]] * n_assign if len(namespaces) == 1 else [namespaces[i] for i in a_ns.tolist()],
        )
        tier.set_generation(a_slots, a_gens)
        inventory.note_generations(a_gens)
        committed = inventory.commit(c_slots, c_layers, c_heads[:, 0], c_heads[:, 1], c_sums)
        if committed != len(c_slots):
            log.warning("%d layer commits named slots this node does not hold", len(c_slots) - committed)
        # Free: publish the new generation first (fences readers and writers), then forget the slot.
        tier.set_generation(f_slots, f_gens)
        inventory.note_generations(f_gens)
        inventory.free(f_slots)
        return pb.SlotUpdatesResponse(applied=n_assign + committed + len(f_slots))

    @grpc_errors
    async def GetInventory(
        self, request: pb.InventoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.InventoryResponse:
        tier, inventory = self._region(request.tier)
        return pb.InventoryResponse(
            node_id=self._state.node_id,
            incarnation=self._state.incarnation,
            slots=inventory.snapshot(self._state.highest_term),
            tier=tier.tier,
        )

    @grpc_errors
    async def GetStats(
        self, request: pb.NodeStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeStatsResponse:
        stats = self._data_stats
        tiers = []
        for region in self._mover.regions.values():
            served = region.tier is self._tier  # the data server serves the DRAM pool only
            tiers.append(
                pb.TierStats(
                    tier=region.tier.tier,
                    capacity_bytes=region.tier.capacity_bytes,
                    used_bytes=region.inventory.used_bytes,
                    slots_in_use=len(region.inventory),
                    bytes_written=stats.bytes_written if served else getattr(region.tier, "bytes_written", 0),
                    bytes_read=stats.bytes_read if served else getattr(region.tier, "bytes_read", 0),
                    grant_rejections=stats.grant_rejections if served else 0,
                )
            )
        return pb.NodeStatsResponse(node_id=self._state.node_id, tiers=tiers)

    # -- tiers
    @grpc_errors
    async def MoveSlots(
        self, request: pb.MoveSlotsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MoveSlotsResponse:
        return await self._mover.move(request)

    @grpc_errors
    async def PullSlots(
        self, request: pb.PullSlotsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MoveSlotsResponse:
        return await self._mover.pull(request)

    @grpc_errors
    async def DescribeSlots(
        self, request: pb.DescribeSlotsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SlotUpdates:
        return self._mover.describe(request)
