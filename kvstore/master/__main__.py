"""``kvstore-master``: serve the control plane until SIGINT/SIGTERM.

Without ``--etcd`` the master keeps its control state in the embedded backend
and leads at once.  With ``--etcd HOST:PORT[,...]`` any number of masters may
run: each serves gRPC from the start, as a standby (answering NOT_LEADER with
the leader's address) until it wins the election, then as the leader
(:mod:`kvstore.master.role`).  The readiness line is printed once the server
listens (and, embedded, once it leads)::

    kvstore-master listening on HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc

from kvstore import config, logs
from kvstore.errors import KVStoreError
from kvstore.master.metrics import serve_metrics
from kvstore.master.role import MasterRole
from kvstore.master.service import add_servicers, server_options
from kvstore.metadata import create_backend

log = logging.getLogger("kvstore.master")

GRACE_S = 1.0


def leader_ttl_s(cfg: config.Config) -> int:
    """The leader lease in whole seconds (etcd leases are), at least 1."""
    return max(1, -(-int(cfg.leader_ttl_ms) // 1000))


async def serve(cfg: config.Config) -> None:
    metadata = create_backend(cfg.etcd, cluster=cfg.cluster, leader_ttl_s=leader_ttl_s(cfg))
    role = MasterRole(cfg, metadata)
    server = grpc.aio.server(options=server_options(cfg.max_message_bytes))
    kvstore_servicer = add_servicers(server, role)
    metrics: asyncio.Server | None = None
    try:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        address = f"{cfg.host}:{port}"
        await server.start()
        # Embedded, this master is the only one: it leads before it says it is ready.
        await role.start(address, wait_for_leadership=not cfg.etcd.strip())
        if cfg.metrics_port:
            metrics = await serve_metrics(role, cfg.host, cfg.metrics_port)
        print(f"kvstore-master listening on {address}", flush=True)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
    finally:
        kvstore_servicer.end_streams()  # clients keep their Call streams open: end them first
        await server.stop(GRACE_S)
        if metrics is not None:
            metrics.close()
        await role.stop()
        await metadata.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvstore-master", description="kvstore master (control plane)")
    config.add_flags(parser, "master")
    cfg = config.from_args(parser.parse_args())
    logs.setup(cfg.log_level, cfg.log_json, component="master")
    try:
        asyncio.run(serve(cfg))
    except (KVStoreError, OSError, RuntimeError) as exc:
        # bad settings or a port in use: one clear line, not a traceback
        print(f"kvstore-master: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
