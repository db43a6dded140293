"""``kvstore-master``: serve the control plane until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc

from kvstore import config, logs
from kvstore.errors import KVStoreError
from kvstore.master.core import Master
from kvstore.master.metrics import serve_metrics
from kvstore.master.service import add_servicers, server_options
from kvstore.metadata import create_backend

log = logging.getLogger("kvstore.master")

GRACE_S = 1.0


async def serve(cfg: config.Config) -> None:
    metadata = create_backend(cfg.etcd)
    master = Master(cfg, metadata)
    server = grpc.aio.server(options=server_options(cfg.max_message_bytes))
    add_servicers(server, master)
    metrics: asyncio.Server | None = None
    try:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        address = f"{cfg.host}:{port}"
        await master.start(address)
        await server.start()
        if cfg.metrics_port:
            metrics = await serve_metrics(master, cfg.host, cfg.metrics_port)
        print(f"kvstore-master listening on {address}", flush=True)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
    finally:
        await server.stop(GRACE_S)
        if metrics is not None:
            metrics.close()
        await master.stop()
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
