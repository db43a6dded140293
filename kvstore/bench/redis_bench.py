"""The Redis baseline of ``kvstore bench``: the same bytes through redis-server on loopback.

The bench starts ``redis-server`` itself (Debian's, no persistence, no config
file) on a free loopback port and stops it afterwards.  The writer and the
reader are separate spawned processes, as for kvstore; each uses redis-py with
the hiredis parser and sends one pipeline (no MULTI) per request: a SET per
segment on put, a GET per segment on get.  Values go out from memoryviews of
one buffer (no copies on our side); GET answers stay the bytes objects hiredis
builds, i.e. Redis is not charged for copying them into an engine's buffer,
which kvstore's get does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

REDIS_PATHS = ("/usr/bin/redis-server", "/usr/sbin/redis-server")


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    return next((p for p in REDIS_PATHS if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(binary: str, timeout_s: float = 20.0) -> Iterator[tuple[int, str]]:
    """Run redis-server on a free loopback port; yields (port, version)."""
    import redis

    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="kvstore-bench-redis-")
    log_path = os.path.join(workdir, "redis.log")
    args = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
        "--daemonize", "no",
        "--dir", workdir,
        "--logfile", log_path,
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        conn = redis.Redis(host="127.0.0.1", port=port)
        while True:
            try:
                conn.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (see {log_path})") from None
                time.sleep(0.05)
        version = str(conn.info("server").get("redis_version", "?"))
        conn.close()
        yield port, version
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True)
class RedisWorkload:
    port: int
    segment_bytes: int
    segments_per_request: int
    requests: int
    run: int


def _buffer(work: RedisWorkload) -> np.ndarray:
    buf = np.empty((work.segments_per_request, work.segment_bytes), dtype=np.uint8)
    buf[...] = np.random.default_rng(7).integers(0, 256, work.segment_bytes, dtype=np.uint8)
    return buf


def _key(work: RedisWorkload, request: int, segment: int) -> bytes:
    return b"bench:%d:%d:%d" % (work.run, request, segment)


def _connect(work: RedisWorkload) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=work.port, socket_timeout=120)


def parser_name() -> str:
    from redis.utils import HIREDIS_AVAILABLE

    return "hiredis" if HIREDIS_AVAILABLE else "python"


def put_run(work: RedisWorkload) -> dict[str, Any]:
    conn = _connect(work)
    data = _buffer(work)
    views = [memoryview(row) for row in data]
    seconds = 0.0
    for request in range(work.requests):
        data[:, :8] = request  # each request's values differ
        started = time.perf_counter()
        pipe = conn.pipeline(transaction=False)
        for segment, view in enumerate(views):
            pipe.set(_key(work, request, segment), view)
        pipe.execute()
        seconds += time.perf_counter() - started
    conn.close()
    return {"seconds": seconds, "bytes": work.requests * data.nbytes, "parser": parser_name()}


def get_run(work: RedisWorkload) -> dict[str, Any]:
    conn = _connect(work)
    seconds = 0.0
    got = 0
    for request in range(work.requests):
        started = time.perf_counter()
        pipe = conn.pipeline(transaction=False)
        for segment in range(work.segments_per_request):
            pipe.get(_key(work, request, segment))
        values = pipe.execute()
        seconds += time.perf_counter() - started
        got += sum(len(v) for v in values if v is not None)
    conn.close()
    return {"seconds": seconds, "bytes": got}


def flush(port: int) -> None:
    import redis

    conn = redis.Redis(host="127.0.0.1", port=port)
    conn.flushall()
    conn.close()
