"""The client's data-plane interface: one call moves many pages and layers of one node.

The control plane answers with :class:`~kvstore._proto.kvstore_pb2.Placements`
(packed per-page arrays); :func:`node_batches` splits them into one
:class:`NodeBatch` per node, and a :class:`Transport` moves a whole batch with
one native copy (shared memory) or a few framed requests (TCP).

The caller's buffer is always ``[len(layers)][num_pages][shard_bytes]``: for a
put of one layer that is the engine's ``[num_pages, shard_bytes]`` tensor, for
a read it is ``out``.  Every offset into it or into a slot comes from
:func:`kvstore.layout.copy_table`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvstore import native
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.layout import Layout, copy_table
from kvstore.tiers.base import SLOT_UNIT

log = logging.getLogger("kvstore.transports")

NO_NODE = 0xFFFF
RunHashes = np.ndarray | Callable[[], np.ndarray]


@dataclass(frozen=True)
class NodeBatch:
    """The pages of one request that live on one node."""

    node: pb.NodeRef
    grant: pb.Grant
    pages: np.ndarray  # int64 positions of these pages in the caller's buffer, ascending
    slot_offsets: np.ndarray  # uint64 slot offsets in the node's pool data area
    generations: np.ndarray  # uint32 slot generations the placement names
    slot_bytes: int

    def __len__(self) -> int:
        return len(self.pages)

    # A put session's batch is written once per layer: what its checks need is worked out once.
    @functools.cached_property
    def slot_units(self) -> np.ndarray:
        """int64 index of each slot in its region's generation table (one u32 per SLOT_UNIT)."""
        return (self.slot_offsets.astype(np.uint64) // np.uint64(SLOT_UNIT)).astype(np.int64)

    @functools.cached_property
    def slots_end(self) -> int:
        """One past the last byte of the batch's slots, in the region's slot area."""
        return int(self.slot_offsets.max()) + self.slot_bytes if len(self.slot_offsets) else 0


@functools.lru_cache(maxsize=16)
def _plan_offsets(
    layout: Layout, layers: tuple[int, ...], heads: tuple[int, int], num_pages: int
) -> np.ndarray:
    """CopyPlan.offsets, built by layout.copy_table once per shape (a put's layers share it)."""
    shard_bytes = layout.shard_bytes(heads)
    table = copy_table(
        np.zeros(num_pages, dtype=np.uint64),
        0,
        layout,
        list(layers),
        heads,
        True,
        buf_page_stride=shard_bytes,
        buf_layer_stride=num_pages * shard_bytes,
    )
    table = table.reshape(len(layers), num_pages, len(layout.shard_runs(heads)), 3)
    table.flags.writeable = False
    return table


@dataclass(frozen=True)
class CopyPlan:
    """Which bytes move: ``heads`` of ``layers`` of every page of the caller's buffer."""

    layout: Layout
    layers: list[int]
    heads: tuple[int, int]
    buffer: np.ndarray  # flat uint8 view of [len(layers)][num_pages][shard_bytes]
    num_pages: int
    # The GPU side (kvstore.gpu.transfer.GpuPlan) when the caller's bytes are on a GPU; ``buffer``
    # is then an empty placeholder and transports hand the batch to kvstore.gpu.transfer.
    device: Any = None
    shard_bytes: int = field(init=False)
    runs_per_shard: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_bytes", self.layout.shard_bytes(self.heads))
        object.__setattr__(self, "runs_per_shard", len(self.layout.shard_runs(self.heads)))
        expected = len(self.layers) * self.num_pages * self.shard_bytes
        if self.device is not None:
            return
        if self.buffer.dtype != np.uint8 or self.buffer.ndim != 1 or self.buffer.size != expected:
            raise KVStoreError(
                ErrorCode.BAD_SIZE, f"copy buffer must be {expected} flat bytes, got {self.buffer.shape}"
            )

    @property
    def address(self) -> int:
        return int(self.buffer.ctypes.data)

    @property
    def offsets(self) -> np.ndarray:
        """(offset in slot, offset in buffer, length) of every run, shaped [layers, pages, runs, 3].

        Shared by every node's batch (a node's table only adds its base addresses to
        its pages' rows) and by every plan of the same shape: read-only.
        """
        return _plan_offsets(self.layout, tuple(self.layers), (self.heads[0], self.heads[1]), self.num_pages)

    def rows(self, batch: NodeBatch) -> np.ndarray:
        """:attr:`offsets` of ``batch``'s pages, [layers, len(batch), runs, 3]."""
        return self.offsets if len(batch) == self.num_pages else self.offsets[:, batch.pages]

    def table(self, batch: NodeBatch, slot_addrs: np.ndarray, to_slots: bool, buf_addr: int) -> np.ndarray:
        """The native.copy (dst, src, len) rows for ``batch``'s pages, shaped [layers, pages, runs, 3].

        ``slot_addrs`` are the batch pages' slot addresses, ``buf_addr`` the buffer's.
        """
        rows = self.rows(batch)
        table = np.empty(rows.shape, dtype=np.uint64)
        slot_col, buf_col = (0, 1) if to_slots else (1, 0)
        # written in place: no temporaries of the table's size
        np.add(rows[..., 0], np.asarray(slot_addrs, dtype=np.uint64)[None, :, None], out=table[..., slot_col])
        np.add(rows[..., 1], np.uint64(buf_addr), out=table[..., buf_col])
        table[..., 2] = rows[..., 2]
        return table

    def slot_ops(self, batch: NodeBatch) -> tuple[np.ndarray, np.ndarray]:
        """Ops for a data server, (slot offset, offset in slot, length) rows, and each op's buffer offset.

        Rows are in table order (layer, page, run), flattened.
        """
        rows = self.rows(batch)
        ops = np.empty(rows.shape, dtype=np.uint64)
        ops[..., 0] = batch.slot_offsets[None, :, None]
        ops[..., 1] = rows[..., 0]
        ops[..., 2] = rows[..., 2]
        return ops.reshape(-1, 3), rows[..., 1].reshape(-1)

    def op_pages(self, batch: NodeBatch) -> np.ndarray:
        """For each op of :meth:`slot_ops`, the index of its page within the batch."""
        per_layer = np.repeat(np.arange(len(batch), dtype=np.int64), self.runs_per_shard)
        return np.tile(per_layer, len(self.layers))


def check_batch(batch: NodeBatch, layout: Layout) -> None:
    if batch.slot_bytes < layout.page_bytes:
        raise KVStoreError(
            ErrorCode.INTERNAL,
            f"placement slot of {batch.slot_bytes} bytes cannot hold a {layout.page_bytes}-byte page",
        )


def node_batches(placements: pb.Placements, pages: np.ndarray) -> tuple[list[NodeBatch], int]:
    """Group ``pages`` (positions into the placement arrays, ascending) by node.

    Returns the batches and the position of the first page that has no node
    (one past the last page asked for if every page has one); pages from there
    on are left out.
    """
    node_index = np.frombuffer(placements.node_index, dtype="<u2")
    slot_offsets = np.frombuffer(placements.slot_offsets, dtype="<u8")
    generations = np.frombuffer(placements.generations, dtype="<u4")
    pages = np.asarray(pages, dtype=np.int64)
    needed = int(pages.max()) + 1 if len(pages) else 0
    if min(len(node_index), len(slot_offsets), len(generations)) < needed:
        raise KVStoreError(ErrorCode.INTERNAL, f"placements describe fewer than the {needed} pages asked for")
    if len(placements.grants) != len(placements.nodes):
        raise KVStoreError(ErrorCode.INTERNAL, "placements carry one grant per node; these do not")
    wanted = node_index[pages]
    unplaced = np.flatnonzero((wanted == NO_NODE) | (wanted >= len(placements.nodes)))
    first_unplaced = int(pages[unplaced[0]]) if len(unplaced) else needed
    if len(unplaced):
        keep = pages < first_unplaced
        pages, wanted = pages[keep], wanted[keep]
    if not len(pages):
        return [], first_unplaced
    if wanted.min() == wanted.max():  # one node holds them all (the common case): no grouping
        groups = [(int(wanted[0]), pages)]
    else:
        groups = [(int(idx), pages[wanted == idx]) for idx in np.unique(wanted)]
    slot_bytes = int(placements.slot_bytes)
    # the fancy indexing copies out of the message's bytes; the dtypes are already the native ones
    return [
        NodeBatch(
            node=placements.nodes[idx],
            grant=placements.grants[idx],
            pages=mine,
            slot_offsets=slot_offsets[mine].astype(np.uint64, copy=False),
            generations=generations[mine].astype(np.uint32, copy=False),
            slot_bytes=slot_bytes,
        )
        for idx, mine in groups
    ], first_unplaced


class Transport(ABC):
    """Moves batches of pages between a caller's buffer and one node's slots."""

    name: ClassVar[str]

    @abstractmethod
    def write(self, batch: NodeBatch, plan: CopyPlan) -> RunHashes:
        """Write the plan's bytes of the batch's pages; return xxh3_64 per run, shaped [layers, pages, runs].

        Raises KVStoreError when any byte may not have landed.  A transport may
        return a zero-argument callable instead, which computes the hashes later
        (a GPU write hashes the landed bytes off the copy's timing); the client
        calls it once, off the caller's thread.
        """

    @abstractmethod
    def read(self, batch: NodeBatch, plan: CopyPlan) -> int:
        """Read the batch's pages into the plan's buffer; return how many leading pages arrived intact.

        A page that is gone, changed during the copy or arrived corrupted ends
        the count: it and every later page of the batch are misses.
        """

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Held around a transfer so that a transport is not torn down under it."""
        yield

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the transport holds."""


class MappedRegionTransport(Transport):
    """A same-host transport that maps a node's region (its pool file, its VRAM by IPC handle).

    The mapping is released only when no transfer is using it: :meth:`retire`
    stops new transfers and the last one out releases it (:meth:`_release`,
    called once).  ``file_removed`` tells when the node removed the file that
    identifies the region (it stopped), by the file's inode.
    """

    def _init_lifetime(self, path: str, what: str) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False
        self._closed = False
        self._watched_path = path
        self._what = what
        self._inode = os.stat(path).st_ino

    @abstractmethod
    def _release(self) -> None:
        """Unmap the region (once, with no transfer running)."""

    @abstractmethod
    def generation_table(self) -> np.ndarray:
        """The region's shared generation table: a u32 per SLOT_UNIT of its slot area."""

    def check_before_write(self, batch: NodeBatch) -> None:
        """A one-sided write goes only into slots still at the generations its session was given."""
        if native.first_moved(self.generation_table(), batch.slot_units, batch.generations) >= 0:
            raise KVStoreError(
                ErrorCode.SESSION_NOT_FOUND,
                f"slots of the {self._what} were freed or reassigned: the put session was lost",
            )

    def intact_after_read(self, batch: NodeBatch) -> int:
        """Pages of a completed one-sided read that are good: up to the first slot whose generation moved
        (it held someone else's bytes at some point of the copy)."""
        moved = native.first_moved(self.generation_table(), batch.slot_units, batch.generations)
        if moved >= 0:
            log.debug(
                "%s: slot generation changed under a read at page %d", self._what, int(batch.pages[moved])
            )
            return moved
        return len(batch)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        with self._lock:
            if self._retired:
                raise KVStoreError(ErrorCode.STALE_INCARNATION, f"{self._what} is no longer mapped")
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                close_now = self._retired and self._users == 0
            if close_now:
                self._release_once()

    def retire(self) -> None:
        """No new transfers; release the mapping once the running ones finish."""
        with self._lock:
            self._retired = True
            close_now = self._users == 0
        if close_now:
            self._release_once()

    def close(self) -> None:
        self.retire()

    def _release_once(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._release()

    def file_removed(self) -> bool:
        """True once the node removed the region's file (it stopped): nothing may be moved there any more."""
        try:
            return os.stat(self._watched_path).st_ino != self._inode
        except OSError:
            return True
