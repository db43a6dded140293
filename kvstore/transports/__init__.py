"""Client-side transports and the choice between them, per node.

Same host means the node's pool file opens here and its header carries the
incarnation the placement names (DESIGN.md, "Transports"): never an address
comparison.  Everything else goes over TCP to the node's data server.

vram: a placement in a node's VRAM region (``NodeRef.tier == "vram"``) goes
through :mod:`kvstore.transports.cuda_ipc` when the region's generation file
opens here with that incarnation (GPU callers move device to device; host
buffers go on to TCP from there), else over TCP.
"""

from __future__ import annotations

import logging
import threading

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.tiers.dram import DramPool
from kvstore.transports import cuda_ipc
from kvstore.transports.base import CopyPlan, NodeBatch, Transport, node_batches
from kvstore.transports.shm import ShmTransport
from kvstore.transports.tcp import ConnectionPool, TcpTransport

log = logging.getLogger("kvstore.transports")

MODES = ("auto", "shm", "tcp")


class TransportSelector:
    """Picks (and caches) the transport for each node a placement names."""

    def __init__(self, mode: str = "auto", copy_threads: int = 1, io_timeout_s: float = 10.0) -> None:
        if mode not in MODES:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"transport must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self._copy_threads = copy_threads
        self._tcp = TcpTransport(ConnectionPool(io_timeout_s), hash_threads=copy_threads)
        # node id -> (incarnation, its mapped pool, or None when it cannot be mapped here)
        self._shm: dict[str, tuple[bytes, ShmTransport | None]] = {}
        # vram: node id -> (incarnation, its VRAM region over CUDA IPC, or None when not reachable here)
        self._ipc: dict[str, tuple[bytes, cuda_ipc.CudaIpcTransport | None]] = {}
        self._lock = threading.Lock()

    def for_node(self, node: pb.NodeRef) -> Transport:
        if self.mode == "tcp":
            return self._tcp
        if node.tier == "vram":
            ipc = self._ipc_for(node)
            if ipc is not None:
                return ipc
            if self.mode == "shm":
                raise KVStoreError(
                    ErrorCode.STALE_INCARNATION,
                    f"transport=shm, but the VRAM region of node {node.node_id} cannot be reached here "
                    "with the incarnation the placement names",
                )
            return self._tcp
        shm = self._shm_for(node)
        if shm is not None:
            return shm
        if self.mode == "shm":
            raise KVStoreError(
                ErrorCode.STALE_INCARNATION,
                f"transport=shm, but the pool of node {node.node_id} ({node.pool_path or 'none'}) "
                "cannot be mapped here with the incarnation the placement names",
            )
        return self._tcp

    def _shm_for(self, node: pb.NodeRef) -> ShmTransport | None:
        with self._lock:
            cached = self._shm.get(node.node_id)
            if cached is not None and cached[0] == node.incarnation:
                shm = cached[1]
                if shm is None or not shm.file_removed():
                    return shm
                # The node stopped and removed its pool: unmap it so its memory goes back to the host.
                shm.retire()
                self._shm[node.node_id] = (node.incarnation, None)
                return None
            if cached is not None and cached[1] is not None:
                cached[1].retire()  # an older incarnation of this node
            shm = self._attach(node)
            self._shm[node.node_id] = (node.incarnation, shm)
            return shm

    def _ipc_for(self, node: pb.NodeRef) -> cuda_ipc.CudaIpcTransport | None:
        with self._lock:
            cached = self._ipc.get(node.node_id)
            if cached is not None and cached[0] == node.incarnation:
                ipc = cached[1]
                if ipc is None or not ipc.file_removed():
                    return ipc
                ipc.retire()  # the node stopped: its region is gone
                self._ipc[node.node_id] = (node.incarnation, None)
                return None
            if cached is not None and cached[1] is not None:
                cached[1].retire()  # an older incarnation of this node
            ipc = cuda_ipc.attach(node, self._tcp, self._copy_threads)
            self._ipc[node.node_id] = (node.incarnation, ipc)
            return ipc

    def _attach(self, node: pb.NodeRef) -> ShmTransport | None:
        if not node.pool_path:
            return None
        try:
            pool = DramPool.attach(node.pool_path, node.incarnation)
        except (KVStoreError, OSError) as exc:
            log.debug("node %s: pool not mappable here (%s); using TCP", node.node_id, exc)
            return None
        try:
            shm = ShmTransport(pool, self._copy_threads)
        except OSError as exc:  # removed between the attach and now
            pool.close(unlink=False)
            log.debug("node %s: pool vanished while mapping it (%s); using TCP", node.node_id, exc)
            return None
        log.debug("node %s: mapped pool %s", node.node_id, node.pool_path)
        return shm

    def close(self) -> None:
        with self._lock:
            pools: list[ShmTransport | cuda_ipc.CudaIpcTransport] = [
                shm for _, shm in self._shm.values() if shm is not None
            ]
            pools += [ipc for _, ipc in self._ipc.values() if ipc is not None]
            self._shm.clear()
            self._ipc.clear()
        for shm in pools:
            shm.retire()
        self._tcp.close()


CudaIpcTransport = cuda_ipc.CudaIpcTransport

__all__ = [
    "MODES",
    "ConnectionPool",
    "CopyPlan",
    "CudaIpcTransport",
    "NodeBatch",
    "ShmTransport",
    "TcpTransport",
    "Transport",
    "TransportSelector",
    "node_batches",
]
