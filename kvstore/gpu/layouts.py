"""Engines' paged KV pools and their conversion to the store's canonical segments.

An engine keeps, per layer, a pool of fixed-size blocks and gives each request a
list of block ids.  :class:`PagedKV` describes one layer's pool and the
request's blocks; the store reads and writes those blocks in place, converting
to its canonical head-major segment ``[K|V][kv_heads][page_size][head_dim]``
(kvstore/layout.py) in the same pass:

- ``layout="token_major"``: blocks ``[num_blocks, block_size, kv_heads, head_dim]``
  (vLLM, SGLang); a canonical head is ``page_size`` rows of ``head_dim`` items,
  one per token, strided in the pool.
- ``layout="head_major"``: blocks ``[num_blocks, kv_heads, block_size, head_dim]``;
  a head of a block is one contiguous run, and so are consecutive heads.

K and V are two tensors (``k``, ``v``) or one stacked tensor (``stacked=True``)
with the K/V axis first (``[2, num_blocks, ...]``, ``kv_dim=0``) or second
(``[num_blocks, 2, ...]``, ``kv_dim=1``).  MLA pools have one latent (``k`` only;
the head axis may be left out).  Under tensor parallelism the pool holds this
rank's heads only: head ``head_start + j`` of the pool is head ``heads[0] + j`` of
the store's head range.  ``block_size`` must equal the namespace's ``page_size``.
Any strides are accepted as long as one head's ``head_dim`` items of one token
are contiguous; dtypes are raw bytes (bf16, fp16, fp8: only the item size counts).

Op tables are built with numpy (no Python loop over pages or segments) as rows
``(dst, src, row_bytes, rows, dst_pitch, src_pitch)`` for the GPU kernel
``kvs_copy_rows`` (native/gpu_kernels.cu).  :func:`gather_canonical` and
:func:`scatter_canonical` are the CPU reference of the same conversion (numpy
views); they also serve CPU pools (numpy arrays, CPU tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.gpu import arrays
from kvstore.layout import Layout

LAYOUTS = ("token_major", "head_major")


class PagedKV:
    """One layer of an engine's paged KV pool plus the request's block ids (one block per page)."""

    def __init__(
        self,
        k: Any,
        v: Any = None,
        *,
        block_ids: Any,
        layout: str = "token_major",
        stacked: bool = False,
        kv_dim: int = 0,
        head_start: int = 0,
    ) -> None:
        if layout not in LAYOUTS:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"PagedKV layout must be one of {LAYOUTS}, not {layout!r}"
            )
        if stacked and v is not None:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, "PagedKV: a stacked tensor holds K and V; pass no v"
            )
        if kv_dim not in (0, 1):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"PagedKV kv_dim must be 0 or 1, not {kv_dim}")
        if head_start < 0:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"PagedKV head_start {head_start} is negative")
        ids = np.asarray(block_ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, "PagedKV block_ids must be a 1-D sequence of integers"
            )
        self.k = k
        self.v = v
        self.block_ids = ids.astype(np.int64)
        self.layout = layout
        self.stacked = stacked
        self.kv_dim = kv_dim
        self.head_start = head_start

    @property
    def on_gpu(self) -> bool:
        return arrays.is_device_array(self.k)

    def __repr__(self) -> str:
        return (
            f"PagedKV(layout={self.layout!r}, stacked={self.stacked}, blocks={len(self.block_ids)}, "
            f"head_start={self.head_start})"
        )


@dataclass(frozen=True)
class PoolGeometry:
    """One layer's pool resolved against a namespace layout and head range (byte strides)."""

    bases: tuple[int, ...]  # address of block 0, token 0, head 0 of each half (K, V)
    block_stride: int
    token_stride: int
    head_stride: int
    num_blocks: int
    row_bytes: int  # head_dim items of one head of one token
    page_size: int
    heads: int  # heads of the store's range (this rank's)
    head_start: int
    blocks: np.ndarray  # int64 block id per page of the request
    device: int
    readonly: bool
    owners: tuple[Any, ...]  # keeps the memory descriptions alive
    producer_stream: int | None = None  # stream the caller last wrote the pool on (if it said)


def _half_dims(
    info: arrays.ArrayInfo, stacked: bool, kv_dim: int, halves: int
) -> list[tuple[int, tuple, tuple]]:
    """(base address, shape, strides) of each half's ``[blocks, a, b, item-dims]`` view."""
    shape, strides = list(info.shape), list(info.strides)
    if not stacked:
        return [(info.ptr, tuple(shape), tuple(strides))]
    if len(shape) <= kv_dim or shape[kv_dim] != halves:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT,
            f"stacked PagedKV needs {halves} on axis {kv_dim} (K and V), got shape {tuple(shape)}",
        )
    step = strides[kv_dim]
    del shape[kv_dim], strides[kv_dim]
    return [(info.ptr + h * step, tuple(shape), tuple(strides)) for h in range(halves)]


def resolve(
    paged: PagedKV,
    layout: Layout,
    heads: tuple[int, int],
    num_pages: int,
    what: str,
    stream: int | None = None,
) -> PoolGeometry:
    """Check ``paged`` against the namespace and head range; its addresses and byte strides."""
    if not layout.kind:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what}: a PagedKV needs a geometry namespace (kind mha/mla), not opaque segments",
        )
    halves = layout.halves
    if paged.stacked and halves != 2:
        raise KVStoreError(
            ErrorCode.INVALID_ARGUMENT, f"{what}: {layout.kind} has one latent; it cannot be stacked"
        )
    if halves == 2 and not paged.stacked and paged.v is None:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what}: mha needs v (or one stacked tensor)")
    if halves == 1 and paged.v is not None:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what}: {layout.kind} has one latent; pass no v")
    tensors = [paged.k] if paged.stacked or halves == 1 else [paged.k, paged.v]
    infos = [arrays.describe(t, stream) for t in tensors]
    if len({i.device for i in infos}) != 1:
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what}: K and V live on different devices")
    parts = []
    for info in infos:
        parts += _half_dims(info, paged.stacked, paged.kv_dim, halves)
    page_size, nh = layout.page_size, heads[1] - heads[0]
    row_bytes = layout.head_bytes // page_size
    itemsize = infos[0].itemsize
    geometry = None
    for _, shape, strides in parts:
        if len(shape) == 3 and halves == 1:  # latent pool without a head axis
            shape, strides = (shape[0], shape[1], 1, shape[2]), (strides[0], strides[1], 0, strides[2])
        if len(shape) != 4:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what}: a {paged.layout} pool is [num_blocks, "
                + ("block_size, kv_heads" if paged.layout == "token_major" else "kv_heads, block_size")
                + f", head_dim], got shape {shape}",
            )
        if paged.layout == "token_major":
            blocks, block_size, pool_heads, dim = shape
            s_block, s_token, s_head, s_item = strides
        else:
            blocks, pool_heads, block_size, dim = shape
            s_block, s_head, s_token, s_item = strides
        if block_size != page_size:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what}: block_size {block_size} != page_size {page_size}: the store keeps one engine "
                "block per page (register the namespace with the engine's block size)",
            )
        if dim * itemsize != row_bytes:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what}: head_dim {dim} x {itemsize}-byte items = {dim * itemsize} bytes; the namespace "
                f"has {row_bytes} bytes per head per token ({layout.head_dim} x {layout.dtype})",
            )
        if dim > 1 and s_item != itemsize:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what}: head_dim must be the contiguous axis")
        if paged.head_start + nh > pool_heads:
            raise KVStoreError(
                ErrorCode.BAD_RANGE,
                f"{what}: pool holds {pool_heads} heads; heads {heads[0]}..{heads[1]} need "
                f"{nh} from pool head {paged.head_start}",
            )
        this = (blocks, s_block, s_token, s_head)
        if geometry is not None and this != geometry:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"{what}: K and V pools differ in shape or strides"
            )
        geometry = this
    assert geometry is not None
    blocks, s_block, s_token, s_head = geometry
    if len(paged.block_ids) < num_pages:
        raise KVStoreError(
            ErrorCode.BAD_SIZE, f"{what}: {len(paged.block_ids)} block ids for {num_pages} full pages"
        )
    ids = paged.block_ids[:num_pages]
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= blocks):
        raise KVStoreError(ErrorCode.BAD_RANGE, f"{what}: block ids outside [0, {blocks})")
    return PoolGeometry(
        bases=tuple(p[0] for p in parts),
        block_stride=s_block,
        token_stride=s_token,
        head_stride=s_head,
        num_blocks=blocks,
        row_bytes=row_bytes,
        page_size=page_size,
        heads=nh,
        head_start=paged.head_start,
        blocks=ids,
        device=infos[0].device,
        readonly=any(i.readonly for i in infos),
        producer_stream=next((i.stream for i in infos if i.stream is not None), None),
        owners=tuple(i.owner for i in infos),
    )


def row_ops(
    pool: PoolGeometry, pages: np.ndarray, canon_base: np.ndarray, half_stride: int, to_canonical: bool
) -> np.ndarray:
    """The ``kvs_copy_rows`` table moving ``pages`` (positions in the request) of one layer.

    ``canon_base[i]`` is the canonical-side address of head ``heads[0]`` of half 0 of
    page ``pages[i]`` (in a slot, or in a canonical buffer); half ``h`` starts
    ``h * half_stride`` after it, and consecutive heads are ``page_size * row_bytes``
    apart.  Rows are merged where the pool is contiguous (head-major: one op per half
    of a page).
    """
    head_bytes = pool.page_size * pool.row_bytes
    halves = len(pool.bases)
    blocks = pool.blocks[np.asarray(pages, dtype=np.int64)].astype(np.uint64)
    base = np.asarray(canon_base, dtype=np.uint64)
    if pool.token_stride == pool.row_bytes or pool.page_size == 1:
        rows, row, pool_pitch = 1, head_bytes, head_bytes
        if pool.head_stride == head_bytes or pool.heads == 1:
            heads, row, pool_pitch = 1, head_bytes * pool.heads, head_bytes * pool.heads
        else:
            heads = pool.heads
    else:
        rows, row, pool_pitch, heads = pool.page_size, pool.row_bytes, pool.token_stride, pool.heads
    half_base = np.asarray(pool.bases, dtype=np.uint64)  # [halves]
    j = np.arange(heads, dtype=np.uint64)
    # [pages, halves, heads]
    pool_side = (
        half_base[None, :, None]
        + blocks[:, None, None] * np.uint64(pool.block_stride)
        + (np.uint64(pool.head_start) + j[None, None, :]) * np.uint64(pool.head_stride)
    )
    canon_side = (
        base[:, None, None]
        + np.arange(halves, dtype=np.uint64)[None, :, None] * np.uint64(half_stride)
        + j[None, None, :] * np.uint64(head_bytes)
    )
    table = np.empty(pool_side.shape + (6,), dtype=np.uint64)
    table[..., 0] = canon_side if to_canonical else pool_side
    table[..., 1] = pool_side if to_canonical else canon_side
    table[..., 2] = row
    table[..., 3] = rows
    table[..., 4] = row if to_canonical else pool_pitch
    table[..., 5] = pool_pitch if to_canonical else row
    return table.reshape(-1, 6)


def expand_rows(table: np.ndarray) -> np.ndarray:
    """A ``kvs_copy_rows`` table as plain ``(dst, src, len)`` rows (one per row; for CPU copies)."""
    rows = table[:, 3].astype(np.int64)
    index = np.repeat(np.arange(len(table)), rows)
    starts = np.cumsum(rows) - rows
    r = (np.arange(int(rows.sum()), dtype=np.int64) - np.repeat(starts, rows)).astype(np.uint64)
    out = np.empty((len(index), 3), dtype=np.uint64)
    out[:, 0] = table[index, 0] + r * table[index, 4]
    out[:, 1] = table[index, 1] + r * table[index, 5]
    out[:, 2] = table[index, 2]
    return out


# ----------------------------------------------------------------------------- CPU reference


def _pool_view(pool: PoolGeometry, half: int) -> np.ndarray:
    """``[num_blocks, pool heads from head_start, page_size, row_bytes]`` uint8 view of one half."""
    if pool.device != arrays.CPU:
        raise KVStoreError(ErrorCode.INTERNAL, "CPU conversion of a GPU pool")
    info = arrays.ArrayInfo(
        pool.bases[half] + pool.head_start * pool.head_stride,
        (pool.num_blocks, pool.heads, pool.page_size, pool.row_bytes),
        (pool.block_stride, pool.head_stride, pool.token_stride, 1),
        1,
        arrays.CPU,
        pool.readonly,
    )
    return arrays.host_view(info)[..., 0]


def gather_canonical(pool: PoolGeometry, count: int | None = None) -> np.ndarray:
    """The request's first ``count`` pages as canonical shards ``[pages, shard_bytes]`` (CPU pools)."""
    blocks = pool.blocks[:count]
    halves = [_pool_view(pool, h)[blocks] for h in range(len(pool.bases))]  # [pages, heads, tokens, row]
    return np.stack(halves, axis=1).reshape(len(blocks), -1)


def scatter_canonical(pool: PoolGeometry, canonical: np.ndarray) -> None:
    """Write canonical shards ``[pages, shard_bytes]`` into the request's first blocks (CPU pools)."""
    pages = canonical.shape[0]
    blocks = pool.blocks[:pages]
    shaped = canonical.reshape(pages, len(pool.bases), pool.heads, pool.page_size, pool.row_bytes)
    for h in range(len(pool.bases)):
        _pool_view(pool, h)[blocks] = shaped[:, h]


def as_layers(obj: Any, count: int, what: str) -> list[PagedKV] | None:
    """``obj`` as one PagedKV per layer (a PagedKV for one layer, or a sequence), or None if it is not paged."""
    if isinstance(obj, PagedKV):
        items: Sequence[Any] = [obj]
    elif isinstance(obj, list | tuple) and obj and all(isinstance(x, PagedKV) for x in obj):
        items = obj
    else:
        return None
    if len(items) != count:
        raise KVStoreError(
            ErrorCode.BAD_SIZE, f"{what}: {len(items)} PagedKV for {count} layer(s); pass one per layer"
        )
    return list(items)
