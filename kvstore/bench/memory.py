"""Master memory per page: RSS growth of a real master process while it indexes N pages.

The master runs as its own process (the harness's :class:`~kvstore.testing.Cluster`,
whose one real node gets a token 64 MiB).  A stand-in node, served from this
process, registers a region big enough for every page (so placement, most free
first, puts every page there) and acknowledges slot updates without holding
anything: the master's side of every call is the real one (OpenPut
allocates slots, signs grants and sends the assignments; CommitLayer completes
the pages and sends the commits), but no page bytes exist anywhere, so a
million pages fit on a laptop.  Pages have ``layers`` layers of ``segment``
bytes (slot of ``layers * segment`` rounded up to 4 KiB: the smallest, so the
allocator's per-4-KiB generation table is counted at its per-page share).

The figure is ``(RSS after - RSS before) / pages``: the index, the key table,
the allocator, the sessions (alive until their write lease ends) and anything
else a page costs the master.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.keys import KEY_BYTES
from kvstore.testing import Cluster

SLOT_ALIGN = 4096
BATCH_PAGES = 2048


class _StandInNode(pb_grpc.NodeServicer):
    """Acknowledges every slot update; holds nothing."""

    def __init__(self) -> None:
        self.batches = 0

    def ApplySlotUpdates(self, request: pb.SlotUpdates, context: Any) -> pb.SlotUpdatesResponse:  # noqa: N802
        self.batches += 1
        applied = (len(request.assign_slots) + len(request.commit_slots) + len(request.free_slots)) // 8
        return pb.SlotUpdatesResponse(applied=applied)

    def SlotUpdateStream(  # noqa: N802
        self, requests: Iterator[pb.SlotUpdates], context: Any
    ) -> Iterator[pb.SlotUpdatesResponse]:
        # the master's stream of batches (it holds one of the server's threads while open)
        for request in requests:
            yield self.ApplySlotUpdates(request, context)

    def GetInventory(self, request: pb.InventoryRequest, context: Any) -> pb.InventoryResponse:  # noqa: N802
        return pb.InventoryResponse(slots=pb.SlotUpdates())


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class _Heartbeats(threading.Thread):
    def __init__(
        self, stub: pb_grpc.NodeRegistryStub, request: pb.RegisterNodeRequest, interval_s: float
    ) -> None:
        super().__init__(name="bench-standin-heartbeat", daemon=True)
        self._stub, self._request, self._interval = stub, request, interval_s
        self.stop = threading.Event()

    def run(self) -> None:
        beat = pb.HeartbeatRequest(node_id=self._request.node_id, incarnation=self._request.incarnation)
        while not self.stop.wait(self._interval):
            try:
                if not self._stub.Heartbeat(beat, timeout=5).known:
                    self._stub.RegisterNode(self._request, timeout=10)
            except grpc.RpcError:
                pass  # the master is going away at the end of the run


def master_memory(
    pages: int, layers: int = 32, segment: int = 128, heartbeat_ms: int = 500
) -> dict[str, Any]:
    """Index ``pages`` complete pages of ``layers`` layers in a fresh master; return its RSS growth."""
    slot_bytes = -(-layers * segment // SLOT_ALIGN) * SLOT_ALIGN
    capacity = int(pages * slot_bytes / 0.75) // SLOT_ALIGN * SLOT_ALIGN  # below the high watermark
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    standin = _StandInNode()
    pb_grpc.add_NodeServicer_to_server(standin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    lease_ms = 600_000  # sessions stay alive (and counted) for the whole run
    try:
        with Cluster(
            1,
            dram="64MiB",
            write_lease_ms=lease_ms,
            read_lease_ms=lease_ms,
            heartbeat_ms=heartbeat_ms,
            node_ttl_ms=max(10_000, 20 * heartbeat_ms),
            startup_timeout=60.0,
        ) as cluster:
            assert cluster.master is not None
            pid = cluster.master.pid
            channel = grpc.insecure_channel(
                cluster.master_address,
                options=[
                    ("grpc.max_send_message_length", 64 << 20),
                    ("grpc.max_receive_message_length", 64 << 20),
                ],
            )
            registry = pb_grpc.NodeRegistryStub(channel)
            kv = pb_grpc.KVStoreStub(channel)
            registration = pb.RegisterNodeRequest(
                node_id="bench-standin",
                incarnation=secrets.token_bytes(16),
                host_id="bench-standin-host",
                control_address=f"127.0.0.1:{port}",
                data_address="127.0.0.1:1",
                regions=[pb.RegionInfo(tier="dram", capacity_bytes=capacity)],
            )
            registry.RegisterNode(registration, timeout=30)
            beats = _Heartbeats(registry, registration, heartbeat_ms / 1000.0)
            beats.start()
            try:
                namespace = f"bench/memory-{secrets.token_hex(3)}"
                kv.CreateNamespace(
                    pb.CreateNamespaceRequest(
                        spec=pb.NamespaceSpec(
                            name=namespace, page_size=16, num_layers=layers, segment_bytes=segment
                        )
                    ),
                    timeout=30,
                )
                # one small request first: code paths warmed, lazily built tables exist
                _fill(kv, namespace, 64, layers)
                time.sleep(0.5)
                before = rss_bytes(pid)
                started = time.perf_counter()
                stored = _fill(kv, namespace, pages, layers)
                seconds = time.perf_counter() - started
                time.sleep(1.0)  # let the notifier's last batches go out
                after = rss_bytes(pid)
                stats = pb_grpc.AdminStub(channel).ClusterStats(pb.ClusterStatsRequest(), timeout=30)
            finally:
                beats.stop.set()
                channel.close()
    finally:
        server.stop(0)
    return {
        "pages": stored,
        "layers": layers,
        "segment_bytes": segment,
        "slot_bytes": slot_bytes,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_page": (after - before) / stored if stored else 0.0,
        "pages_in_master": int(stats.pages),
        "fill_seconds": seconds,
        "fill_pages_per_s": stored / seconds if seconds > 0 else 0.0,
    }


def _fill(kv: pb_grpc.KVStoreStub, namespace: str, pages: int, layers: int) -> int:
    """Put ``pages`` complete pages (random keys, chains of BATCH_PAGES): OpenPut + one CommitLayer each."""
    layer_ids = np.arange(layers, dtype="<u2").tobytes()
    stored = 0
    while stored < pages:
        count = min(BATCH_PAGES, pages - stored)
        opened = kv.OpenPut(
            pb.OpenPutRequest(namespace=namespace, keys=os.urandom(count * KEY_BYTES), tp_rank=0, tp_size=1),
            timeout=60,
        )
        new = int(np.count_nonzero(np.frombuffer(opened.status, dtype=np.uint8) == pb.PAGE_NEW))
        if new == 0:
            raise RuntimeError(f"the master stored no page of a request at {stored} pages (region full?)")
        kv.CommitLayer(
            pb.CommitLayerRequest(
                session_id=opened.session_id,
                layers=layer_ids,
                checksums=np.zeros(layers * new, dtype="<u8").tobytes(),
            ),
            timeout=60,
        )
        stored += new
    return stored
