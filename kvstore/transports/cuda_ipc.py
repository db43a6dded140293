"""Same-host transport to a node's VRAM region: CUDA IPC, device to device (DESIGN.md, "Transports").

A placement whose NodeRef says ``tier="vram"`` names slots in the node's VRAM
region.  A client on the same host ("same host": the region's generation file
opens here and its header carries the incarnation the placement names, as for
the DRAM pool) opens the region's IPC handle once per (region incarnation,
client device) with ``cudaIpcOpenMemHandle`` and moves all pages and layers of a
node batch with kvstore.gpu's one-launch kernels (or its few strided copies)
straight between the caller's GPU memory and the region.

- Reads re-check every slot's generation in the generation file after the copy
  has completed: a change is a miss from that page on.
- Writes check the generations first (a lost session), and return their run
  hashes, computed from the landed bytes in the region by one XXH3 kernel launch
  queued after the copy (kvstore/gpu/engine.py).
- Host buffers (a CPU reader or writer) are not moved here: they go to the
  node's TCP data server, which stages VRAM slots through pinned memory.

Imports CuPy only when a GPU transfer runs.
"""

from __future__ import annotations

import logging

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.vram import GenerationFile
from kvstore.transports.base import (
    CopyPlan,
    MappedRegionTransport,
    NodeBatch,
    RunHashes,
    Transport,
    check_batch,
)

log = logging.getLogger("kvstore.transports.cuda_ipc")

# cudaIpcMemLazyEnablePeerAccess: a client on another GPU of the host reaches the region over peer access
IPC_LAZY_PEER_ACCESS = 1


class CudaIpcTransport(MappedRegionTransport):
    """One node's VRAM region (one incarnation), opened by IPC handle on each client device that uses it."""

    name = "cuda_ipc"

    def __init__(
        self, node: pb.NodeRef, generations: GenerationFile, fallback: Transport, copy_threads: int = 1
    ) -> None:
        self.node_id = node.node_id
        self._handle = bytes(node.ipc_handle)
        self._region_bytes = int(node.region_bytes) or generations.region_bytes
        self.generations = generations
        self._fallback = fallback  # host buffers: the node's TCP data server
        self._threads = max(1, copy_threads)
        self._pointers: dict[int, int] = {}  # client device -> the region's address there
        self._unopenable: set[int] = set()  # client devices where the handle did not open: TCP there
        self._init_lifetime(generations.path, f"VRAM region of node {self.node_id}")

    def _release(self) -> None:
        with self._lock:
            pointers, self._pointers = self._pointers, {}
        if pointers:
            import cupy

            for device, ptr in pointers.items():
                try:
                    with cupy.cuda.Device(device):
                        cupy.cuda.runtime.ipcCloseMemHandle(ptr)
                except Exception as exc:  # noqa: BLE001 - the node may be gone already
                    log.debug("closing the VRAM IPC mapping of node %s: %s", self.node_id, exc)
        self.generations.close(unlink=False)

    def region_pointer(self, device: int) -> int | None:
        """The region's address on the client's ``device`` (opened once per device); None if it cannot be."""
        with self._lock:
            ptr = self._pointers.get(device)
            if ptr is not None or device in self._unopenable:
                return ptr
            import cupy

            try:
                with cupy.cuda.Device(device):
                    ptr = int(cupy.cuda.runtime.ipcOpenMemHandle(self._handle, IPC_LAZY_PEER_ACCESS))
            except Exception as exc:  # noqa: BLE001 - e.g. no access to the node's GPU from here
                self._unopenable.add(device)
                log.warning(
                    "node %s: its VRAM region does not open on GPU %d (%s); using its data server",
                    self.node_id,
                    device,
                    exc,
                )
                return None
            self._pointers[device] = ptr
            log.debug("node %s: opened its VRAM region on GPU %d at %#x", self.node_id, device, ptr)
            return ptr

    # -- data
    def _check_slots(self, batch: NodeBatch, plan: CopyPlan) -> None:
        check_batch(batch, plan.layout)
        if batch.slots_end > self._region_bytes:
            raise KVStoreError(ErrorCode.BAD_RANGE, "placement runs past the node's VRAM region")

    def write(self, batch: NodeBatch, plan: CopyPlan) -> RunHashes:
        if plan.device is None:
            return self._fallback.write(batch, plan)
        from kvstore.gpu import transfer

        self._check_slots(batch, plan)
        gpu = plan.device
        region = self.region_pointer(gpu.device)
        if region is None:
            return self._fallback.write(batch, plan)
        # checked here, not by the kernel: this process maps the generation file read-only, and
        # registering that mapping with CUDA failed (docs/decisions.md, "GPU data plane")
        self.check_before_write(batch)
        with gpu.engine:
            fused = transfer.write_hashed(plan, batch, region, None)
            if callable(fused):  # queued, not landed: the mapping stays open until the copy is done
                return transfer.hold_until_done(self.in_use(), fused)
            if fused is not None:
                return fused
            transfer._to_slots(plan, batch, region, True)
            # the landed bytes, hashed where they are: one launch after the copy, on its stream
            hashes = transfer.run_hashes_on_device(plan, batch, region)
            gpu.engine.sync()
            return hashes.copy()

    def read(self, batch: NodeBatch, plan: CopyPlan) -> int:
        if plan.device is None:
            return self._fallback.read(batch, plan)
        from kvstore.gpu import transfer

        self._check_slots(batch, plan)
        gpu = plan.device
        region = self.region_pointer(gpu.device)
        if region is None:
            return self._fallback.read(batch, plan)
        with gpu.engine:
            transfer._to_slots(plan, batch, region, False)
            gpu.engine.sync()
        return self.intact_after_read(batch)

    def generation_table(self) -> np.ndarray:
        return self.generations.table


def attach(node: pb.NodeRef, fallback: Transport, copy_threads: int = 1) -> CudaIpcTransport | None:
    """The IPC transport of a VRAM placement's region, or None when it is not on this host."""
    if not node.generation_path or len(node.ipc_handle) != 64:
        return None
    try:
        generations = GenerationFile.attach(node.generation_path, bytes(node.incarnation))
    except (KVStoreError, OSError) as exc:
        log.debug("node %s: VRAM region not reachable here (%s); using TCP", node.node_id, exc)
        return None
    try:
        return CudaIpcTransport(node, generations, fallback, copy_threads)
    except OSError as exc:  # removed between the attach and now
        generations.close(unlink=False)
        log.debug("node %s: VRAM generation file vanished (%s); using TCP", node.node_id, exc)
        return None
