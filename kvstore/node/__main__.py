"""kvstore-node: the storage node daemon.

Start-up: bind the data socket (its port names the node by default), create
the DRAM pool (sweeping orphans of dead nodes first), start the gRPC ``Node``
service and the TCP data server, then register with the master and heartbeat.
With ``--etcd`` the node first registers in etcd under a lease of ``node_ttl_ms``
(the record is its RegisterNodeRequest, so a new leader can adopt it without
waiting to hear from it), keeps that lease alive every ``heartbeat_ms``, and
finds the leading master through etcd; without it, the ``--master`` addresses
are tried in turn.  Once registered with a master it prints one line::

    kvstore-node NODE_ID data HOST:PORT control HOST:PORT

SIGINT/SIGTERM stop the servers and remove the pool file; the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time

import grpc

from kvstore import config, hostid, logs
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.config import format_size
from kvstore.errors import KVStoreError
from kvstore.metadata import MetadataBackend, NodeRegistration, create_backend
from kvstore.node.data_server import DataServer, open_listener
from kvstore.node.inventory import Inventory
from kvstore.node.master_link import MasterLink
from kvstore.node.moves import Mover, Region
from kvstore.node.service import NodeService
from kvstore.node.state import NodeState
from kvstore.tiers.base import SLOT_UNIT, Tier
from kvstore.tiers.dram import DramPool

log = logging.getLogger("kvstore.node")

# A TCP data request may carry this many times the largest gRPC message.
DATA_REQUEST_FACTOR = 64
SHUTDOWN_GRACE_S = 1.0
PREFAULT_NOTICE_BYTES = 4 << 30  # pools this large say when their pre-fault starts and ends


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def advertised_host(cfg: config.Config) -> str:
    """The name other hosts reach this node by: --advertise-host, else --host unless it is a wildcard."""
    if cfg.advertise_host:
        return str(cfg.advertise_host)
    if cfg.host in ("", "0.0.0.0", "::", "[::]"):
        return socket.getfqdn()
    return str(cfg.host)


class StoreRegistration:
    """This node's registration in the metadata store: registered, kept alive, registered again if it lapsed."""

    def __init__(
        self, metadata: MetadataBackend, node_id: str, info: bytes, ttl_s: float, interval_s: float
    ) -> None:
        self._metadata = metadata
        self._node_id = node_id
        self._info = info
        self._ttl_s = ttl_s
        self._interval_s = interval_s
        self._registration: NodeRegistration | None = None

    async def run(self) -> None:
        failing = False
        while True:
            try:
                if self._registration is None:
                    self._registration = await self._metadata.register_node(
                        self._node_id, self._info, self._ttl_s
                    )
                    log.info("registered in the metadata store (TTL %.1f s)", self._ttl_s)
                elif not await self._metadata.keepalive_node(self._registration):
                    log.warning("the node's registration lapsed in the metadata store; registering again")
                    self._registration = None
                    continue
                if failing:
                    log.warning("metadata store reachable again")
                failing = False
            except KVStoreError as exc:
                if not failing:
                    log.warning(
                        "cannot renew the node's registration (%s); still serving, retrying", exc.message
                    )
                failing = True
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        """A clean shutdown ends the registration now, so the leader drops this node's pages at once."""
        registration, self._registration = self._registration, None
        if registration is not None:
            with contextlib.suppress(KVStoreError, TimeoutError):
                await asyncio.wait_for(self._metadata.unregister_node(registration), SHUTDOWN_GRACE_S)


def parse_secret(text: str) -> bytes | None:
    if not text:
        return None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SystemExit("kvstore-node: --grant-secret must be hexadecimal") from None
    if len(secret) < 16:
        raise SystemExit("kvstore-node: --grant-secret must be at least 16 bytes (32 hex digits)")
    return secret


async def run_node(cfg: config.Config) -> None:
    """Run the node until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    secret = parse_secret(cfg.grant_secret)
    data_bytes = cfg.dram // SLOT_UNIT * SLOT_UNIT
    if data_bytes <= 0:
        raise SystemExit(f"kvstore-node: --dram must be at least {SLOT_UNIT} bytes")

    async with contextlib.AsyncExitStack() as cleanup:
        listener = open_listener(cfg.host, cfg.data_port)
        cleanup.callback(listener.close)
        data_port = int(listener.getsockname()[1])
        node_id = cfg.node_id or f"{socket.gethostname()}-{data_port}"
        os.makedirs(cfg.shm_dir, exist_ok=True)
        # Prefaulting a large pool takes seconds: keep it off the loop so signals are still handled.
        if cfg.prefault and data_bytes >= PREFAULT_NOTICE_BYTES:
            log.info("pre-faulting the %s DRAM pool (about 1 s per GB)", format_size(data_bytes))
        started = time.monotonic()
        pool = await asyncio.to_thread(DramPool.create, cfg.shm_dir, node_id, data_bytes, cfg.prefault)
        if cfg.prefault and data_bytes >= PREFAULT_NOTICE_BYTES:
            log.info("DRAM pool ready in %.1f s", time.monotonic() - started)
        cleanup.callback(pool.close, True)

        state = NodeState(node_id, pool.header.incarnation, secret)
        inventory = Inventory(pool.capacity_bytes)
        regions = {"dram": Region(pool, inventory)}
        region_infos = [pb.RegionInfo(tier=pool.tier, capacity_bytes=pool.capacity_bytes)]
        for extra in await open_extra_tiers(cfg, node_id, pool.header.incarnation):
            cleanup.callback(extra.close, True)
            regions[extra.tier] = Region(extra, Inventory(extra.capacity_bytes))
            region_infos.append(extra_region_info(extra))
        mover = Mover(state, regions, cfg.copy_threads, cfg.rpc_timeout_ms / 1000.0)
        cleanup.callback(mover.close)
        data_server = DataServer(
            listener,
            pool,
            inventory,
            state,
            cfg.max_message_bytes * DATA_REQUEST_FACTOR,
            cfg.copy_threads,
            # vram: the data server also serves the VRAM region (grants name it), staged through pinned memory
            others={tier: (r.tier, r.inventory) for tier, r in regions.items() if tier == "vram"},
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                # the inventory of a large pool can exceed the usual message limit
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        service = NodeService(state, pool, inventory, data_server.stats, mover)
        pb_grpc.add_NodeServicer_to_server(service, server)
        control_port = server.add_insecure_port(join_host_port(cfg.host, cfg.node_port))
        await server.start()
        cleanup.push_async_callback(server.stop, SHUTDOWN_GRACE_S)
        # runs before the stop: the master's slot-update stream would hold the whole grace period
        cleanup.push_async_callback(service.close)
        data_server.start()
        cleanup.push_async_callback(asyncio.to_thread, data_server.stop)

        host = advertised_host(cfg)
        data_address = join_host_port(host, data_port)
        control_address = join_host_port(host, control_port)
        registration = pb.RegisterNodeRequest(
            node_id=node_id,
            incarnation=pool.header.incarnation,
            host_id=hostid.host_id(cfg.host_id),
            control_address=control_address,
            data_address=data_address,
            pool_path=pool.path,
            pool_data_offset=pool.header.data_offset,
            pool_bytes=pool.header.data_offset + pool.header.data_bytes,
            regions=region_infos,
        )

        def announce(_: pb.RegisterNodeResponse) -> None:
            if link.registrations == 1:
                print(f"kvstore-node {node_id} data {data_address} control {control_address}", flush=True)

        metadata: MetadataBackend | None = None
        background: list[asyncio.Task[None]] = []
        if cfg.etcd.strip():
            metadata = create_backend(cfg.etcd, cluster=cfg.cluster)
            cleanup.push_async_callback(metadata.close)
            in_store = StoreRegistration(
                metadata,
                node_id,
                registration.SerializeToString(),
                ttl_s=cfg.node_ttl_ms / 1000.0,
                interval_s=cfg.heartbeat_ms / 1000.0,
            )
            cleanup.push_async_callback(in_store.close)
            background.append(asyncio.create_task(in_store.run(), name="kvstore-node-registration"))

        link = MasterLink(
            [a.strip() for a in cfg.master.split(",") if a.strip()],
            registration,
            state,
            heartbeat_ms=cfg.heartbeat_ms,
            rpc_timeout_ms=cfg.rpc_timeout_ms,
            secret_configured=secret is not None,
            on_registered=announce,
            find_leader=metadata.leader if metadata is not None else None,
        )
        cleanup.push_async_callback(link.close)
        link_task = asyncio.create_task(link.run(), name="kvstore-node-master-link")
        log.info(
            "node %s serving: data %s, control %s, pool %s", node_id, data_address, control_address, pool.path
        )

        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({link_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if link_task in done:
            stop_task.cancel()
            link_task.result()  # MasterLink.run only ends by failing: surface it
        for task in (link_task, *background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.info("node %s stopping", node_id)


async def open_extra_tiers(cfg: config.Config, node_id: str, incarnation: bytes = b"") -> list[Tier]:
    """The NVMe and VRAM regions the flags ask for (VRAM without CUDA: one log line, no region)."""
    extra: list[Tier] = []
    if cfg.vram.strip():
        from kvstore.tiers import vram

        capacity, device = vram.parse_spec(cfg.vram)
        # its generation table goes in a file beside the pool, for same-host CUDA-IPC readers
        region = await asyncio.to_thread(
            vram.open_region, capacity, device, cfg.shm_dir, node_id, incarnation
        )
        if region is not None:
            extra.append(region)
    if cfg.nvme.strip():
        from kvstore.tiers.nvme import NvmeRegion, parse_spec

        capacity, directory = parse_spec(cfg.nvme)
        extra.append(
            await asyncio.to_thread(
                NvmeRegion.create, directory, node_id, capacity, cfg.nvme_direct, cfg.nvme_io_threads
            )
        )
    return extra


def extra_region_info(region: Tier) -> pb.RegionInfo:
    info = pb.RegionInfo(tier=region.tier, capacity_bytes=region.capacity_bytes)
    if region.tier == "vram":
        info.ipc_handle = region.ipc_handle  # type: ignore[attr-defined]
        info.device = region.device  # type: ignore[attr-defined]
        info.generation_path = region.generation_path  # type: ignore[attr-defined]
    return info


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvstore-node", description="kvstore storage node")
    config.add_flags(parser, config.NODE)
    cfg = config.from_args(parser.parse_args())
    logs.setup(cfg.log_level, cfg.log_json, component="node")
    try:
        asyncio.run(run_node(cfg))
    except (OSError, RuntimeError, ValueError) as exc:
        # Start-up failures (a tmpfs too small, a port in use) end with the reason, not a traceback.
        log.debug("node failed", exc_info=True)
        print(f"kvstore-node: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
