"""GPU transfers for the transports (imports CuPy; loaded only when a GPU array is passed).

Same host, DRAM tier (:func:`shm_write`, :func:`shm_read`): the client's
mapping of the node's pool is host-registered once.  A read into a canonical
array whose batch pages sit in a few runs of consecutive slots moves by the copy
engines: layer ``l`` of such a run is one strided region (width the shard's head
run, pitch the slot size, height the run length), one cudaMemcpy2DAsync each, at
the speed of one plain copy.  Everything else (writes, fragmented slots, an
engine's paged blocks) is one kernel launch over an op table.  A canonical
array's write is copied and hashed (XXH3) by one kernel (:func:`write_hashed`),
or, for runs that kernel does not take, hashed by a kernel ahead of the copy
(:meth:`GpuEngine.hash_ranges`); an engine's paged blocks are not contiguous
runs there, so their DRAM writes return the hashes as a callable that hashes the
landed pool bytes on the host, off the copy's timing (docs/decisions.md).

Other host (:func:`staged_write`, :func:`staged_read`): the GPU side is
gathered into (or scattered from) a pinned staging buffer of the device by one
kernel or one cudaMemcpy, and the ordinary TCP transport moves the staging
buffer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore import native
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.gpu import arrays, hostreg, layouts
from kvstore.gpu.engine import GpuEngine, engine_for, fusable
from kvstore.memo import IdentityMemo
from kvstore.transports.base import CopyPlan, NodeBatch, RunHashes

if TYPE_CHECKING:
    from kvstore.transports.shm import ShmTransport
    from kvstore.transports.tcp import TcpTransport

_CUDA_DLPACK = (2, 13)
# The copy-engine path is taken while a batch needs at most this many strided copies
# (layers x head runs x runs of consecutive slots); more fragmented batches take the
# one-launch kernel, whose cost does not grow with the number of runs.
MAX_RECT_COPIES = 64
# Writes of canonical arrays take the kernel as well: their GPU hash runs just ahead, and after it
# the copy engines' transfer into the pool ran ~1 ms per GiB slower than the kernel's on an H100
# (bench/RESULTS.md, "GPU checksums").  Benchmarks turn it on to measure both paths.
RECT_WRITES = False


@dataclasses.dataclass
class GpuPlan:
    """The GPU side of a :class:`~kvstore.transports.base.CopyPlan`: one of ``canonical`` or ``pools``."""

    device: int
    engine: GpuEngine
    canonical: arrays.ArrayInfo | None = None  # [len(layers)][num_pages][shard_bytes], C-contiguous
    pools: list[layouts.PoolGeometry] | None = None  # one per layer of the plan
    producer_stream: int | None = None  # stream the caller's array was last written on (if it said)
    # False: a write returns once its copy is queued, with a callable that waits for it (pipelined
    # async puts, KVStoreClient.put_layer_async); True: once the bytes have landed
    wait: bool = True

    def layers(self, first: int, stop: int, layer_bytes: int) -> GpuPlan:
        """The plan of layers ``[first, stop)`` of this one (a streamed read of some layers)."""
        if self.canonical is not None:
            c = self.canonical
            part = dataclasses.replace(
                c,
                ptr=c.ptr + first * layer_bytes,
                shape=((stop - first) * layer_bytes,),
                strides=(1,),
                itemsize=1,
            )
            return dataclasses.replace(self, canonical=part)
        assert self.pools is not None
        return dataclasses.replace(self, pools=self.pools[first:stop])


def device_of(obj: Any) -> int:
    if arrays.is_torch_cuda_tensor(obj):
        return int(obj.device.index)
    dl_device = getattr(obj, "__dlpack_device__", None)
    if dl_device is not None:
        kind, ident = dl_device()
        if int(kind) in _CUDA_DLPACK:
            return int(ident)
    info = arrays.describe_device(obj)
    if info is None:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{type(obj).__name__} is not a GPU array")
    return info.device


def canonical_plan(obj: Any, what: str, expected: int, shape: str, writable: bool) -> GpuPlan:
    engine = engine_for(device_of(obj))
    info = arrays.describe_device(obj, engine.stream.ptr)
    assert info is not None
    if not info.contiguous:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what} must be C-contiguous")
    if writable and info.readonly:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what} must be writable")
    if info.nbytes != expected:
        raise KVStoreError(
            ErrorCode.BAD_SIZE, f"{what} holds {info.nbytes} bytes; expected {expected} ({shape})"
        )
    return GpuPlan(info.device, engine, canonical=info, producer_stream=info.stream)


def paged_plan(
    pools: list[layouts.PagedKV],
    what: str,
    layout: Any,
    heads: tuple[int, int],
    num_pages: int,
    writable: bool,
) -> GpuPlan:
    engine = engine_for(device_of(pools[0].k))
    geometries = [layouts.resolve(p, layout, heads, num_pages, what, engine.stream.ptr) for p in pools]
    if any(g.device != engine.device for g in geometries):
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what}: the layers' pools live on different devices")
    if writable and any(g.readonly for g in geometries):
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what} must be writable")
    if writable:
        for g in geometries:
            if len(np.unique(g.blocks)) != len(g.blocks):
                raise KVStoreError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"{what}: a block id repeats; pages would overwrite each other",
                )
    # An engine keeps one stream for its KV pools (K and V, every layer): the first one named orders the copy.
    producer = next((g.producer_stream for g in geometries if g.producer_stream is not None), None)
    return GpuPlan(engine.device, engine, pools=geometries, producer_stream=producer)


# ----------------------------------------------------------------------------- op tables


def _launch(
    plan: CopyPlan, batch: NodeBatch, canon_addrs: np.ndarray, half_stride: int | None, to_canon: bool
) -> None:
    """One launch between the GPU side and canonical memory (slots or a staging buffer).

    ``canon_addrs[li, i]``: canonical-side address of the shard of plan layer ``li`` and batch page
    ``i``, at head ``heads[0]`` of half 0; ``half_stride`` is the distance between its halves
    (None: the canonical side is a copy of the caller's canonical buffer layout).
    """
    gpu: GpuPlan = plan.device
    gpu.engine.wait_for(gpu.producer_stream)
    if gpu.canonical is not None:
        gpu.engine.copy_segments(
            _canonical_table(plan, batch, canon_addrs, half_stride, to_canon).reshape(-1, 3)
        )
        return
    assert gpu.pools is not None
    tables = [
        layouts.row_ops(pool, batch.pages, canon_addrs[li], half_stride or 0, to_canon)
        for li, pool in enumerate(gpu.pools)
    ]
    gpu.engine.copy_rows(np.concatenate(tables) if len(tables) > 1 else tables[0])


def _canonical_table(
    plan: CopyPlan, batch: NodeBatch, canon_addrs: np.ndarray, half_stride: int | None, to_canon: bool
) -> np.ndarray:
    """(dst, src, len) of every run between a canonical array and canonical memory, [layers, pages, runs, 3]."""
    gpu: GpuPlan = plan.device
    assert gpu.canonical is not None
    rows = plan.rows(batch)
    if half_stride is None:  # staging: same offsets on both sides
        canon_side = rows[..., 1] + np.uint64(int(canon_addrs))
    else:
        canon_side = rows[..., 0] + canon_addrs[:, :, None]
    dev_side = rows[..., 1] + np.uint64(gpu.canonical.ptr)
    table = np.empty(rows.shape, dtype=np.uint64)
    table[..., 0], table[..., 1] = (canon_side, dev_side) if to_canon else (dev_side, canon_side)
    table[..., 2] = rows[..., 2]
    return table


def write_hashed(
    plan: CopyPlan, batch: NodeBatch, slots_address: int, generations_address: int | None
) -> RunHashes | None:
    """A canonical array's write into slots at ``slots_address``, copied and hashed by one launch.

    ``generations_address``: the region's u32 generation table as the device sees it; the kernel
    copies a slot's bytes only while the slot is still at the generation the batch names (the
    one-sided write's check, done where and when the bytes move) and the write fails with
    SESSION_NOT_FOUND if any slot moved.  None: the caller checked the generations already.

    Returns the run hashes, [layers, pages, runs], once the bytes have landed (or, for a plan
    that does not wait, at once a callable that waits for them and returns them); None (nothing
    done, nothing checked) when the batch does not suit the fused kernel (the caller checks,
    copies and hashes apart) or the benchmarks force the copy engines.  Call inside the engine's
    lock.
    """
    gpu: GpuPlan = plan.device
    if gpu.canonical is None or RECT_WRITES:
        return None
    ops, checks, aligned = _relative_ops(plan, batch)
    dst_base = slots_address + _layer_base(plan)
    if not aligned or (dst_base | gpu.canonical.ptr) & 15:
        return None
    gpu.engine.wait_for(gpu.producer_stream)
    gpu.engine.begin()
    queued = gpu.engine.copy_hash_ops_queued(
        ops,
        dst_base,
        gpu.canonical.ptr,
        None if generations_address is None else checks,
        generations_address or 0,
    )
    shape = (len(plan.layers), len(batch), plan.runs_per_shard)

    def finish() -> np.ndarray:
        hashes, skipped = queued()
        if skipped:
            raise KVStoreError(
                ErrorCode.SESSION_NOT_FOUND,
                f"{skipped} slot(s) of the write were freed or reassigned: the put session was lost",
            )
        return hashes.reshape(shape)

    if not gpu.wait:
        return finish
    gpu.engine.sync()
    return finish()


def _layer_base(plan: CopyPlan) -> int:
    """What a write's relative table leaves to the kernel's slot-side base: a one-layer plan's
    segment offset (so that one table serves every layer of a batch), else nothing."""
    return plan.layout.segment_offset(plan.layers[0]) if len(plan.layers) == 1 else 0


def _generation_checks(plan: CopyPlan, batch: NodeBatch) -> np.ndarray:
    """(generation table index, generation) of each row of the batch's table, [layers, pages, runs] order."""
    per_page = np.stack([batch.slot_units, batch.generations.astype(np.int64)], axis=1)
    rows = np.repeat(per_page, plan.runs_per_shard, axis=0)
    return np.tile(rows, (len(plan.layers), 1)).astype(np.uint64)


# The device tables of one-layer writes, by batch: a put session's batch is the same object for
# every layer, and its op table differs from layer to layer only by the layer's segment offset and
# the caller array's address, which the kernel adds as bases.  Building and uploading the tables
# of a 16384-page layer cost ~0.8 ms of host time per put_layer on an H100 host.  Entries hold
# the plan's layout and heads with the tables.
_OPS_MEMO = IdentityMemo(8)


def _relative_ops(plan: CopyPlan, batch: NodeBatch) -> tuple[Any, Any, bool]:
    """(device table of (slot-side offset, offset in the array, length) rows, device table of
    their generation checks, whether every row is 16-byte aligned) of a write of ``batch``: the
    slot side relative to the slot area plus :func:`_layer_base`, the array side to its start.
    A one-layer plan's tables are remembered per batch."""
    gpu: GpuPlan = plan.device
    assert gpu.canonical is not None
    one_layer = len(plan.layers) == 1
    shape_key = (plan.layout, plan.heads, plan.num_pages, gpu.device)
    if one_layer:
        hit = _OPS_MEMO.get(batch)
        if hit is not None and hit[0] == shape_key:
            return hit[1], hit[2], hit[3]
    table = _canonical_table(plan, batch, _slot_run_starts(plan, batch, 0), 0, True)
    table[..., 0] -= np.uint64(_layer_base(plan))
    table[..., 1] -= np.uint64(gpu.canonical.ptr)
    rows = table.reshape(-1, 3)
    aligned = fusable(rows)
    ops = gpu.engine.upload_ops(rows) if aligned else None
    checks = gpu.engine.upload_ops(_generation_checks(plan, batch), 2) if aligned else None
    if one_layer:
        _OPS_MEMO.put(batch, (shape_key, ops, checks, aligned))
    return ops, checks, aligned


def _slot_addrs(plan: CopyPlan, batch: NodeBatch, data_address: int) -> np.ndarray:
    """[layers, pages] address of the shard (head ``heads[0]`` of half 0) in each slot."""
    layout = plan.layout
    layer_off = np.array([layout.segment_offset(x) for x in plan.layers], dtype=np.uint64)
    slots = np.uint64(data_address) + batch.slot_offsets.astype(np.uint64)
    return layer_off[:, None] + slots[None, :] + np.uint64(plan.heads[0] * layout.head_bytes)


def _slot_run_starts(plan: CopyPlan, batch: NodeBatch, data_address: int) -> np.ndarray:
    """[layers, pages] slot address added to the plan's per-run slot offsets (canonical arrays)."""
    slots = np.uint64(data_address) + batch.slot_offsets.astype(np.uint64)
    return np.broadcast_to(slots[None, :], (len(plan.layers), len(batch)))


def slot_rects(plan: CopyPlan, batch: NodeBatch, data_address: int, to_slots: bool) -> np.ndarray | None:
    """The batch as strided copies between a canonical array and the slots, or None if too fragmented.

    Rows (dst, dst_pitch, src, src_pitch, width, height): one per layer, head run
    (1 for all heads, 2 for a head range: K and V) and run of pages that sit in
    consecutive slots and consecutive positions of the array.
    """
    gpu: GpuPlan = plan.device
    assert gpu.canonical is not None
    layout = plan.layout
    count = len(batch)
    if count == 0:
        return np.empty((0, 6), dtype=np.uint64)
    pages = batch.pages
    starts, heights = _page_runs(batch)
    head_runs = np.array(layout.shard_runs(plan.heads), dtype=np.uint64)  # (in segment, in shard, length)
    if len(plan.layers) * len(head_runs) * len(starts) > MAX_RECT_COPIES:
        return None
    shard = np.uint64(plan.shard_bytes)
    layer_stride = np.uint64(plan.num_pages * plan.shard_bytes)
    layer_idx = np.arange(len(plan.layers), dtype=np.uint64)
    segment = np.array([layout.segment_offset(x) for x in plan.layers], dtype=np.uint64)
    # [layers, head runs, page runs]
    slot_side = (
        np.uint64(data_address)
        + batch.slot_offsets[starts].astype(np.uint64)[None, None, :]
        + segment[:, None, None]
        + head_runs[None, :, 0, None]
    )
    array_side = (
        np.uint64(gpu.canonical.ptr)
        + layer_idx[:, None, None] * layer_stride
        + pages[starts].astype(np.uint64)[None, None, :] * shard
        + head_runs[None, :, 1, None]
    )
    rects = np.empty((*slot_side.shape, 6), dtype=np.uint64)
    rects[..., 0] = slot_side if to_slots else array_side
    rects[..., 1] = np.uint64(batch.slot_bytes) if to_slots else shard
    rects[..., 2] = array_side if to_slots else slot_side
    rects[..., 3] = shard if to_slots else np.uint64(batch.slot_bytes)
    rects[..., 4] = head_runs[None, :, 2, None]
    rects[..., 5] = heights[None, None, :]
    return rects.reshape(-1, 6)


# The page runs of the last few batches, by batch identity: a put session's batches and a held
# lease's batches are the same objects from layer to layer, and finding their runs is the only
# per-page pass of slot_rects.
_RUN_MEMO = IdentityMemo(16)


def _page_runs(batch: NodeBatch) -> tuple[np.ndarray, np.ndarray]:
    """(first index, length) of each run of the batch's pages that sit in consecutive slots and positions."""
    hit = _RUN_MEMO.get(batch)
    if hit is not None:
        return hit
    count = len(batch)
    slots = batch.slot_offsets.astype(np.int64)
    breaks = np.flatnonzero((np.diff(slots) != batch.slot_bytes) | (np.diff(batch.pages) != 1)) + 1
    starts = np.concatenate(([0], breaks)).astype(np.int64)
    heights = np.diff(np.concatenate((starts, [count]))).astype(np.uint64)
    _RUN_MEMO.put(batch, (starts, heights))
    return starts, heights


def _to_slots(plan: CopyPlan, batch: NodeBatch, data_device_address: int, to_slots: bool) -> None:
    gpu: GpuPlan = plan.device
    gpu.engine.begin()
    if gpu.canonical is not None:
        rects = (
            slot_rects(plan, batch, data_device_address, to_slots) if RECT_WRITES or not to_slots else None
        )
        if rects is not None:
            gpu.engine.wait_for(gpu.producer_stream)
            gpu.engine.copy_rects(rects)
            return
        _launch(plan, batch, _slot_run_starts(plan, batch, data_device_address), 0, to_slots)
    else:
        half_stride = plan.layout.kv_heads * plan.layout.head_bytes
        _launch(plan, batch, _slot_addrs(plan, batch, data_device_address), half_stride, to_slots)


# ----------------------------------------------------------------------------- same host


def _pool_device_base(transport: ShmTransport, device: int) -> int:
    """The pool mapping as the device sees it (registered whole: slot area and generation table)."""
    pool = transport.pool
    return hostreg.device_pointer(pool.base_address, len(pool.bytes), device)


def _pool_device_data(transport: ShmTransport, device: int) -> int:
    return _pool_device_base(transport, device) + transport.pool.header.data_offset


def run_hashes_on_device(plan: CopyPlan, batch: NodeBatch, slots_address: int | None) -> np.ndarray:
    """XXH3 of the batch's runs, [layers, pages, runs], hashed on the GPU by one launch.

    ``slots_address``: the runs are read where they landed (slots in device memory at that
    address), after the copies queued so far; None: from the caller's canonical array (queue
    it before the copies).  Call inside the engine's lock; the result holds the hashes after
    the engine's sync and until its next hash (copy it out).
    """
    gpu: GpuPlan = plan.device
    rows = plan.rows(batch)
    ranges = np.empty((*rows.shape[:3], 2), dtype=np.uint64)
    if slots_address is None:
        assert gpu.canonical is not None
        gpu.engine.wait_for(gpu.producer_stream)
        ranges[..., 0] = rows[..., 1] + np.uint64(gpu.canonical.ptr)
    else:
        slots = np.uint64(slots_address) + batch.slot_offsets.astype(np.uint64)
        ranges[..., 0] = rows[..., 0] + slots[None, :, None]
    ranges[..., 1] = rows[..., 2]
    return gpu.engine.hash_ranges(ranges.reshape(-1, 2)).reshape(rows.shape[:3])


def shm_write(transport: ShmTransport, batch: NodeBatch, plan: CopyPlan, threads: int) -> RunHashes:
    """Kernel or strided copies from the GPU into the batch's slots; returns the run hashes.

    A canonical array's hashes come from its GPU (ready on return); paged blocks' are
    deferred to the client's hash thread, which reads the landed pool bytes.
    """
    gpu: GpuPlan = plan.device
    base, header = _pool_device_base(transport, gpu.device), transport.pool.header
    with gpu.engine:
        fused = write_hashed(plan, batch, base + header.data_offset, base + header.gen_offset)
    if callable(fused):  # queued, not landed: the pool stays mapped until the copy is done
        return hold_until_done(transport.in_use(), fused)
    if fused is not None:
        return fused
    transport.check_before_write(batch)
    with gpu.engine:
        if gpu.canonical is not None:
            on_device = run_hashes_on_device(plan, batch, None)  # from HBM, ahead of the copies
            _to_slots(plan, batch, _pool_device_data(transport, gpu.device), True)
            gpu.engine.sync()
            return on_device.copy()
        _to_slots(plan, batch, _pool_device_data(transport, gpu.device), True)
        gpu.engine.sync()
    data_address = transport.pool.data_address
    hold = contextlib.ExitStack()
    hold.enter_context(transport.in_use())  # the pool stays mapped until the hash has read it

    def hashes() -> np.ndarray:
        # The hash table is built here, on the client's hash thread, not on the caller's.
        try:
            runs = plan.table(batch, np.uint64(data_address) + batch.slot_offsets, True, 0)
            ranges = np.ascontiguousarray(runs[..., [0, 2]].reshape(-1, 2))
            return native.hash_ranges(ranges, threads).reshape(runs.shape[:3])
        finally:
            hold.close()

    return hashes


def hold_until_done(
    held: contextlib.AbstractContextManager[Any], finish: Callable[[], np.ndarray]
) -> Callable[[], np.ndarray]:
    """``finish`` (waits for a queued write, returns its hashes) run inside ``held`` (a mapping kept open)."""
    stack = contextlib.ExitStack()
    stack.enter_context(held)

    def hashes() -> np.ndarray:
        try:
            return finish()
        finally:
            stack.close()

    return hashes


def shm_read(transport: ShmTransport, batch: NodeBatch, plan: CopyPlan) -> None:
    """Kernel from the batch's slots into the GPU; returns once the bytes have landed."""
    gpu: GpuPlan = plan.device
    with gpu.engine:
        _to_slots(plan, batch, _pool_device_data(transport, gpu.device), False)
        gpu.engine.sync()


# ----------------------------------------------------------------------------- other host


def _stage(plan: CopyPlan, batch: NodeBatch, staging: hostreg.StagingBuffer, to_stage: bool) -> None:
    gpu: GpuPlan = plan.device
    total = len(plan.layers) * plan.num_pages * plan.shard_bytes
    gpu.engine.begin()
    if gpu.canonical is not None:
        if len(batch) == plan.num_pages:  # the whole buffer: one plain copy
            gpu.engine.wait_for(gpu.producer_stream)
            if to_stage:
                gpu.engine.memcpy(staging.address, gpu.canonical.ptr, total)
            else:
                gpu.engine.memcpy(gpu.canonical.ptr, staging.address, total)
        else:
            _launch(plan, batch, np.uint64(staging.device_address), None, to_stage)  # type: ignore[arg-type]
        return
    layer_idx = np.arange(len(plan.layers), dtype=np.uint64)[:, None]
    page_off = batch.pages.astype(np.uint64)[None, :] * np.uint64(plan.shard_bytes)
    addrs = (
        np.uint64(staging.device_address)
        + layer_idx * np.uint64(plan.num_pages * plan.shard_bytes)
        + page_off
    )
    heads = plan.heads[1] - plan.heads[0]
    _launch(plan, batch, addrs, heads * plan.layout.head_bytes, to_stage)


def _host_plan(plan: CopyPlan, staging: hostreg.StagingBuffer) -> CopyPlan:
    total = len(plan.layers) * plan.num_pages * plan.shard_bytes
    return CopyPlan(plan.layout, plan.layers, plan.heads, staging.view(total), plan.num_pages)


def staged_write(transport: TcpTransport, batch: NodeBatch, plan: CopyPlan) -> np.ndarray:
    gpu: GpuPlan = plan.device
    staging = hostreg.staging_for(gpu.device)
    with staging.lock:
        host_plan = _host_plan(plan, staging)
        with gpu.engine:
            _stage(plan, batch, staging, True)
            gpu.engine.sync()
        hashes = transport.write(batch, host_plan)
        assert isinstance(hashes, np.ndarray)
        return hashes


def staged_read(transport: TcpTransport, batch: NodeBatch, plan: CopyPlan) -> int:
    gpu: GpuPlan = plan.device
    staging = hostreg.staging_for(gpu.device)
    with staging.lock:
        host_plan = _host_plan(plan, staging)
        intact = transport.read(batch, host_plan)
        if intact:
            landed = batch if intact == len(batch) else _first(batch, intact)
            with gpu.engine:
                _stage(plan, landed, staging, False)
                gpu.engine.sync()
        return intact


def _first(batch: NodeBatch, count: int) -> NodeBatch:
    return dataclasses.replace(
        batch,
        pages=batch.pages[:count],
        slot_offsets=batch.slot_offsets[:count],
        generations=batch.generations[:count],
    )
