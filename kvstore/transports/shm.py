"""Same-host transport: copy straight into / out of the node's mapped DRAM pool.

One native copy per batch (all pages and layers of that node), with the GIL
released.  Writes hash inside the copy, so the commit checksums cost no second
pass.  Reads re-check the slot generations after the copy: a slot freed or
reassigned meanwhile is a miss from that page on.
"""

from __future__ import annotations

import logging

import numpy as np

from kvstore import native
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.gpu import release_host_memory
from kvstore.tiers.dram import DramPool
from kvstore.transports.base import CopyPlan, MappedRegionTransport, NodeBatch, RunHashes, check_batch

log = logging.getLogger("kvstore.transports.shm")


class ShmTransport(MappedRegionTransport):
    """One attached pool (one node incarnation)."""

    name = "shm"

    def __init__(self, pool: DramPool, copy_threads: int = 1) -> None:
        self.pool = pool
        self._threads = max(1, copy_threads)
        self._init_lifetime(pool.path, f"pool {pool.path}")

    def _release(self) -> None:
        release_host_memory(self.pool.base_address)  # registered with CUDA if a GPU write used it
        self.pool.close(unlink=False)

    # -- data
    def _check_slots(self, batch: NodeBatch, plan: CopyPlan) -> None:
        check_batch(batch, plan.layout)
        if batch.slots_end > self.pool.header.data_bytes:
            raise KVStoreError(ErrorCode.BAD_RANGE, "range outside the pool's slot area")

    def write(self, batch: NodeBatch, plan: CopyPlan) -> RunHashes:
        self._check_slots(batch, plan)
        if plan.device is not None:
            # GPU memory: one kernel into the registered pool (it checks the generations)
            from kvstore.gpu import transfer

            return transfer.shm_write(self, batch, plan, self._threads)
        self.check_before_write(batch)
        slot_addrs = np.uint64(self.pool.data_address) + batch.slot_offsets
        table = plan.table(batch, slot_addrs, to_slots=True, buf_addr=plan.address)
        hashes = native.copy(table.reshape(-1, 3), with_hashes=True, threads=self._threads)
        assert hashes is not None
        return hashes.reshape(table.shape[:3])

    def read(self, batch: NodeBatch, plan: CopyPlan) -> int:
        self._check_slots(batch, plan)
        if plan.device is not None:  # GPU memory: one kernel from the registered pool, completed here
            from kvstore.gpu import transfer

            transfer.shm_read(self, batch, plan)
        else:
            slot_addrs = np.uint64(self.pool.data_address) + batch.slot_offsets
            table = plan.table(batch, slot_addrs, to_slots=False, buf_addr=plan.address)
            native.copy(table.reshape(-1, 3), threads=self._threads)
        return self.intact_after_read(batch)

    def generation_table(self) -> np.ndarray:
        return self.pool.generations
