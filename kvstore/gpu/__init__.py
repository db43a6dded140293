"""GPU data plane of the client SDK (DESIGN.md, "Transports"; issue 5).

``put_layer`` / ``put_layers`` / ``get_prefix`` take, for ``kv`` / ``out``:

- a canonical array on the GPU (CuPy array, torch CUDA tensor, anything with the
  CUDA array interface or a CUDA DLPack device): the same bytes as the CPU
  form, ``[len(layers), num_full_pages, shard_bytes]``, C-contiguous;
- a :class:`PagedKV` (GPU or CPU): one layer of an engine's paged pool plus the
  request's block ids; a sequence of them for several layers.

Importing this package imports neither CuPy nor torch: :mod:`kvstore.gpu.transfer`
(which does) is loaded only when a GPU array is actually passed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.gpu import arrays, layouts
from kvstore.gpu.layouts import PagedKV
from kvstore.layout import Layout

__all__ = ["CallerSide", "PagedKV", "caller_side", "release_host_memory"]


@dataclass
class CallerSide:
    """What a put or get moves from or into, when it is not a plain host buffer.

    ``buffer`` is the flat host buffer the copy plan uses: the canonical form of a
    CPU paged pool, or a placeholder of the right size (no memory) when ``gpu``
    carries the plan's GPU side.
    """

    buffer: np.ndarray
    gpu: Any = None  # kvstore.gpu.transfer.GpuPlan
    data: Any = None  # what a hit hands back: the caller's GPU ``out``; None: views of ``buffer``
    _cpu_pools: list[layouts.PoolGeometry] = field(default_factory=list)

    def hit_data(self, data: np.ndarray, found: int) -> Any:
        """What the hit of a read of ``found`` pages hands back; a CPU paged pool gets them in its blocks.

        GPU ``out``: ``out`` itself (its first ``found`` pages are valid).  CPU paged
        pools: the canonical ``[layers, found, shard_bytes]`` bytes they were filled from.
        """
        for li, pool in enumerate(self._cpu_pools):
            if found:
                layouts.scatter_canonical(pool, data[li, :found])
        return self.data if self.data is not None else data[:, :found]

    def layers(self, first: int, stop: int, layer_bytes: int) -> Any:
        """The GPU side of positions ``[first, stop)`` of the plan's layers (a streamed read); None for CPU."""
        return None if self.gpu is None else self.gpu.layers(first, stop, layer_bytes)

    def layer_data(self, index: int, data: np.ndarray, found: int) -> Any:
        """What a streamed layer hands back once position ``index`` holds ``found`` pages.

        GPU canonical ``out``: ``out[index, :found]`` where ``out`` has a layer axis,
        else ``out`` itself.  GPU paged pools: that layer's :class:`PagedKV`, its blocks
        filled.  CPU paged pools: their blocks are filled from ``data`` (the layer's
        ``[found, shard_bytes]`` canonical host bytes), which is handed back, as hit_data does.
        """
        if self._cpu_pools:
            if found:
                layouts.scatter_canonical(self._cpu_pools[index], data[:found])
            return data[:found]
        if isinstance(self.data, PagedKV):
            return self.data
        if isinstance(self.data, list | tuple):
            return self.data[index]
        if self.data is None:
            return data[:found]
        shape: tuple[int, ...] = tuple(getattr(self.data, "shape", ()))
        if len(shape) >= 2 and int(shape[0]) > index:
            return self.data[index, :found]
        return self.data


def caller_side(
    obj: Any,
    what: str,
    layout: Layout,
    layers: list[int],
    heads: tuple[int, int],
    num_pages: int,
    writable: bool,
) -> CallerSide | None:
    """A :class:`CallerSide` for GPU arrays and paged pools; None for plain host buffers."""
    if obj is None or isinstance(obj, np.ndarray | bytes | bytearray | memoryview):
        return None
    shard = layout.shard_bytes(heads)
    total = len(layers) * num_pages * shard
    pools = layouts.as_layers(obj, len(layers), what)
    if pools is not None:
        if pools[0].on_gpu:
            from kvstore.gpu import transfer

            gpu = transfer.paged_plan(pools, what, layout, heads, num_pages, writable)
            return CallerSide(_placeholder(total), gpu, obj)
        geometries = [layouts.resolve(p, layout, heads, num_pages, what) for p in pools]
        if any(g.device != arrays.CPU for g in geometries):
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what}: mixes GPU and CPU pools")
        buffer = np.empty(total, dtype=np.uint8)
        if writable:
            if any(g.readonly for g in geometries):
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"{what} must be writable")
            return CallerSide(buffer, None, None, geometries)
        # The CPU path hashes inside its copy, from a canonical buffer: gather the blocks into it.
        canonical = buffer.reshape(len(layers), num_pages, shard)
        for li, g in enumerate(geometries):
            canonical[li] = layouts.gather_canonical(g, num_pages)
        return CallerSide(buffer)
    if not arrays.is_device_array(obj):
        return None
    from kvstore.gpu import transfer

    shape = f"{len(layers)} layer(s) x {num_pages} full pages x {shard} bytes per shard of heads {heads[0]}..{heads[1]}"
    gpu = transfer.canonical_plan(obj, what, total, shape, writable)
    return CallerSide(_placeholder(total), gpu, obj)


def _placeholder(nbytes: int) -> np.ndarray:
    """A flat uint8 array of ``nbytes`` that owns no memory (all elements alias one byte)."""
    return np.broadcast_to(np.zeros(1, dtype=np.uint8), (nbytes,))


def release_host_memory(address: int) -> None:
    """Unregister host memory from CUDA if this process registered it (a pool mapping being closed)."""
    hostreg = sys.modules.get("kvstore.gpu.hostreg")
    if hostreg is not None:
        hostreg.unregister(address)
