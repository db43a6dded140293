"""Namespace layout: segment and slot geometry (DESIGN.md, "Data model").

A segment is one layer of one page.  Geometry namespaces lay it out head-major,
``[K|V][kv_heads][page_size][head_dim]`` (``mla``: one latent, no K/V split), so
any head range is one contiguous run per K/V half.  A slot holds every layer of
one page, page-first: layer ``l`` starts at ``l * segment_bytes``; slots are
4 KiB aligned.  This module is the only place these offsets are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError

SLOT_ALIGN = 4096
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_SEGMENT_BYTES = 1 << 30

DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


def align_up(n: int, align: int = SLOT_ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Layout:
    """Derived geometry of one namespace."""

    name: str
    page_size: int
    num_layers: int
    segment_bytes: int
    kind: str = ""  # "" (opaque), "mha" or "mla"
    kv_heads: int = 1
    head_dim: int = 0
    dtype: str = ""

    @classmethod
    def build(
        cls,
        name: str,
        page_size: int,
        num_layers: int,
        segment_bytes: int = 0,
        kind: str = "",
        kv_heads: int = 0,
        head_dim: int = 0,
        dtype: str = "",
    ) -> Layout:
        """Validate a namespace definition (either form) and derive the segment size."""
        if not name or len(name.encode()) > 256 or any(c in name for c in "\0\n"):
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, "namespace name must be 1-256 bytes of printable text"
            )
        if not 0 < page_size <= 65536:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"page_size {page_size} outside 1..65536")
        if not 0 < num_layers <= MAX_LAYERS:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"num_layers {num_layers} outside 1..{MAX_LAYERS}")
        if kind:
            if kind not in ("mha", "mla"):
                raise KVStoreError(
                    ErrorCode.INVALID_ARGUMENT, f"geometry kind must be 'mha' or 'mla', not {kind!r}"
                )
            if dtype not in DTYPE_BYTES:
                raise KVStoreError(
                    ErrorCode.INVALID_ARGUMENT, f"dtype {dtype!r} not one of {sorted(DTYPE_BYTES)}"
                )
            if kind == "mla":
                kv_heads = kv_heads or 1
                if kv_heads != 1:
                    raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "mla has one latent: kv_heads must be 1")
            if not 0 < kv_heads <= MAX_KV_HEADS or head_dim <= 0:
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "kv_heads and head_dim must be positive")
            derived = (2 if kind == "mha" else 1) * kv_heads * page_size * head_dim * DTYPE_BYTES[dtype]
            if segment_bytes and segment_bytes != derived:
                raise KVStoreError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"segment_bytes {segment_bytes} contradicts the geometry ({derived} bytes)",
                )
            segment_bytes = derived
        else:
            kv_heads, head_dim, dtype = 1, 0, ""
        if not 0 < segment_bytes <= MAX_SEGMENT_BYTES:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"segment_bytes {segment_bytes} outside 1..{MAX_SEGMENT_BYTES}"
            )
        return cls(name, page_size, num_layers, segment_bytes, kind, kv_heads, head_dim, dtype)

    @classmethod
    def from_spec(cls, spec: Any) -> Layout:
        """The layout of a ``kvstore.v1.NamespaceSpec`` message (either form)."""
        geometry = spec.geometry if spec.HasField("geometry") and spec.geometry.kind else None
        return cls.build(
            spec.name,
            spec.page_size,
            spec.num_layers,
            spec.segment_bytes,
            kind=geometry.kind if geometry else "",
            kv_heads=geometry.kv_heads if geometry else 0,
            head_dim=geometry.head_dim if geometry else 0,
            dtype=geometry.dtype if geometry else "",
        )

    # -- sizes
    @property
    def page_bytes(self) -> int:
        return self.num_layers * self.segment_bytes

    @property
    def slot_bytes(self) -> int:
        return align_up(self.page_bytes)

    @property
    def halves(self) -> int:
        """K and V for mha; one latent otherwise (opaque segments count as one half of one head)."""
        return 2 if self.kind == "mha" else 1

    @property
    def head_bytes(self) -> int:
        """Bytes of one head of one half in one segment."""
        return self.segment_bytes // (self.halves * self.kv_heads)

    @property
    def replicated(self) -> bool:
        """Opaque and mla segments are not split by head: one tp rank writes them."""
        return self.kind != "mha"

    # -- tensor parallelism
    def head_range(self, tp_rank: int, tp_size: int) -> tuple[int, int]:
        """Heads written by ``tp_rank`` of ``tp_size``; the whole segment for replicated layouts."""
        if tp_size <= 0 or not 0 <= tp_rank < tp_size:
            raise KVStoreError(ErrorCode.BAD_RANGE, f"tp_rank {tp_rank} not in [0, tp_size={tp_size})")
        if self.replicated:
            return 0, self.kv_heads
        if self.kv_heads % tp_size:
            raise KVStoreError(
                ErrorCode.BAD_RANGE, f"kv_heads {self.kv_heads} not divisible by tp_size {tp_size}"
            )
        per = self.kv_heads // tp_size
        return tp_rank * per, (tp_rank + 1) * per

    def check_heads(self, heads: tuple[int, int] | None) -> tuple[int, int]:
        if heads is None:
            return 0, self.kv_heads
        begin, end = heads
        if not 0 <= begin < end <= self.kv_heads:
            raise KVStoreError(ErrorCode.BAD_RANGE, f"head range {heads} outside [0, {self.kv_heads}]")
        if self.replicated and (begin, end) != (0, self.kv_heads):
            raise KVStoreError(
                ErrorCode.BAD_RANGE, f"{self.kind or 'opaque'} segments cannot be split by head"
            )
        return begin, end

    def shard_bytes(self, heads: tuple[int, int]) -> int:
        return self.halves * (heads[1] - heads[0]) * self.head_bytes

    def shard_runs(self, heads: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(offset in segment, offset in shard, length) of each contiguous run of a head range."""
        begin, end = heads
        if (begin, end) == (0, self.kv_heads):
            return [(0, 0, self.segment_bytes)]
        run = (end - begin) * self.head_bytes
        half = self.kv_heads * self.head_bytes
        return [(h * half + begin * self.head_bytes, h * run, run) for h in range(self.halves)]

    def check_layers(self, layers: list[int] | range | None) -> list[int]:
        if layers is None:
            return list(range(self.num_layers))
        result = [int(x) for x in layers]
        if not result:
            raise KVStoreError(ErrorCode.BAD_RANGE, "no layers asked for")
        for layer in result:
            if not 0 <= layer < self.num_layers:
                raise KVStoreError(ErrorCode.BAD_RANGE, f"layer {layer} outside [0, {self.num_layers})")
        return result

    def segment_offset(self, layer: int) -> int:
        return layer * self.segment_bytes


_MIX = np.uint64(0x9E3779B97F4A7C15)


def shard_checksums(run_hashes: np.ndarray, runs_per_shard: int) -> np.ndarray:
    """One checksum per shard from the xxh3_64 of its runs (K run, V run).

    A shard of the whole head range is one run and its checksum is that run's
    xxh3_64; a partial head range has one run per half, combined here.
    """
    h = np.asarray(run_hashes, dtype=np.uint64).reshape(-1, runs_per_shard)
    out = h[:, 0].copy()
    with np.errstate(over="ignore"):
        for r in range(1, runs_per_shard):
            out = (out * _MIX) ^ h[:, r]
    return out


def copy_table(
    slot_addrs: np.ndarray,
    buf_addr: int,
    layout: Layout,
    layers: list[int],
    heads: tuple[int, int],
    to_slots: bool,
    buf_page_stride: int,
    buf_layer_stride: int,
) -> np.ndarray:
    """The packed (dst, src, len) table that moves ``heads`` of ``layers`` between slots and a buffer.

    ``slot_addrs[p]`` is the address of page p's slot; the buffer holds, for each
    layer and page, the shard ``[half][heads][page_size][head_dim]`` at
    ``buf_addr + li * buf_layer_stride + p * buf_page_stride``.  Built with numpy
    broadcasting: no Python loop over pages or segments.
    """
    runs = np.array(layout.shard_runs(heads), dtype=np.uint64)  # [runs, 3]
    layer_off = np.array([layout.segment_offset(x) for x in layers], dtype=np.uint64)
    layer_idx = np.arange(len(layers), dtype=np.uint64)
    pages = np.asarray(slot_addrs, dtype=np.uint64)
    page_idx = np.arange(len(pages), dtype=np.uint64)
    # shape [layers, pages, runs]
    slot_side = layer_off[:, None, None] + pages[None, :, None] + runs[None, None, :, 0]
    buf_side = (
        np.uint64(buf_addr)
        + layer_idx[:, None, None] * np.uint64(buf_layer_stride)
        + page_idx[None, :, None] * np.uint64(buf_page_stride)
        + runs[None, None, :, 1]
    )
    lengths = np.broadcast_to(runs[None, None, :, 2], slot_side.shape)
    table = np.empty(slot_side.shape + (3,), dtype=np.uint64)
    table[..., 0] = slot_side if to_slots else buf_side
    table[..., 1] = buf_side if to_slots else slot_side
    table[..., 2] = lengths
    return table.reshape(-1, 3)
