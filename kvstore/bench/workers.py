"""The writer and the reader of ``kvstore bench``: each runs in its own spawned process.

A run moves ``total_bytes`` as requests of ``pages_per_request`` pages (each
request a distinct prompt), layer by layer, exactly as an engine would.  Only
the client calls are timed: stamping and checking the pages' first bytes (so
the reader proves it got the writer's pages, not stale ones) is not.
Buffers are allocated and faulted in before the clock starts and reused, as an
engine reuses its KV buffers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore import config as kvconfig

_clients: dict[tuple[str, str, str], Any] = {}
_buffers: dict[tuple[str, int, int, int], np.ndarray] = {}


@dataclass(frozen=True)
class Workload:
    master: str
    namespace: str
    transport: str  # "shm" or "tcp"
    segment_bytes: int
    num_layers: int
    page_tokens: int
    pages_per_request: int
    requests: int
    run: int  # repeat index: each run writes fresh prompts

    @property
    def request_bytes(self) -> int:
        return self.pages_per_request * self.num_layers * self.segment_bytes

    def tokens(self, request: int) -> np.ndarray:
        """A distinct prompt per (run, request): its first token differs, so every page key does."""
        n = self.pages_per_request * self.page_tokens
        tokens = np.arange(n, dtype=np.int64) % 50_000
        tokens[0] = 100_000 + self.run * 1_000_000 + request
        return tokens

    def stamps(self, request: int) -> np.ndarray:
        """The value written into the first 8 bytes of each page of each layer of a request."""
        page = np.arange(self.pages_per_request, dtype=np.int64)
        return ((self.run * 1_000_000 + request) << 24) + (page << 8)


def _client(work: Workload) -> Any:
    from kvstore.client import KVStoreClient

    key = (work.master, work.namespace, work.transport)
    if key not in _clients:
        cfg = kvconfig.load({"transport": work.transport}, environ={})
        _clients[key] = KVStoreClient(work.master, namespace=work.namespace, config=cfg)
    return _clients[key]


def _buffer(role: str, layers: int, pages: int, segment: int) -> np.ndarray:
    """``[layers, pages, segment]`` bytes, faulted in once and reused across runs."""
    key = (role, layers, pages, segment)
    if key not in _buffers:
        _buffers.clear()  # one size at a time: keep the worker's memory bounded
        buf = np.empty((layers, pages, segment), dtype=np.uint8)
        buf[...] = np.random.default_rng(7).integers(0, 256, segment, dtype=np.uint8)
        _buffers[key] = buf
    return _buffers[key]


def put_run(work: Workload) -> dict[str, Any]:
    """Write every request's layers; return the timed seconds and the bytes the store took."""
    client = _client(work)
    client.create_namespace(
        page_size=work.page_tokens, num_layers=work.num_layers, segment_bytes=work.segment_bytes
    )
    data = _buffer("put", work.num_layers, work.pages_per_request, work.segment_bytes)
    first_words = data.view(np.int64)[:, :, 0]  # [layers, pages]: the stamp slot of each segment
    pages_written = 0
    seconds = 0.0
    for request in range(work.requests):
        tokens = work.tokens(request)
        first_words[:, :] = work.stamps(request)[None, :] + np.arange(work.num_layers)[:, None]
        started = time.perf_counter()
        for layer in range(work.num_layers):
            pages_written += int(client.put_layer(tokens, layer, data[layer]))
        seconds += time.perf_counter() - started
    return {
        "seconds": seconds,
        "bytes": pages_written * work.segment_bytes,
        "expected_bytes": work.requests * work.request_bytes,
    }


def get_run(work: Workload) -> dict[str, Any]:
    """Read every request back into one reused buffer; return the timed seconds, bytes read and bad stamps."""
    client = _client(work)
    out = _buffer("get", work.num_layers, work.pages_per_request, work.segment_bytes)
    pages_read = 0
    wrong = 0
    seconds = 0.0
    for request in range(work.requests):
        tokens = work.tokens(request)
        started = time.perf_counter()
        hit = client.get_prefix(tokens, out=out)
        seconds += time.perf_counter() - started
        pages = int(hit.num_pages)
        pages_read += pages
        expected = work.stamps(request)[None, :pages] + np.arange(work.num_layers)[:, None]
        got = np.ascontiguousarray(hit.data[:, :pages, :8]).view(np.int64)[:, :, 0]
        wrong += int(np.count_nonzero(got != expected))
    return {
        "seconds": seconds,
        "bytes": pages_read * work.num_layers * work.segment_bytes,
        "expected_bytes": work.requests * work.request_bytes,
        "wrong_stamps": wrong,
    }


def close_clients() -> None:
    for client in _clients.values():
        close = getattr(client, "close", None)
        if callable(close):
            close()
    _clients.clear()
