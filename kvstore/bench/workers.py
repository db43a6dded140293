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

_clients: dict[tuple[Any, ...], Any] = {}
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
    client_settings: tuple[
        tuple[str, str], ...
    ] = ()  # kvstore.config client settings (kvstore bench --client)
    first_request: int = 0  # this worker's requests are [first_request, first_request + requests)
    open_ahead: bool = False  # the writer opens request i+1's put (KVStoreClient.open_put) during request i

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

    key = (work.master, work.namespace, work.transport, work.client_settings)
    if key not in _clients:
        cfg = kvconfig.load({"transport": work.transport, **dict(work.client_settings)}, environ={})
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
    began = time.monotonic()
    stop = work.first_request + work.requests
    for request in range(work.first_request, stop):
        tokens = work.tokens(request)
        first_words[:, :] = work.stamps(request)[None, :] + np.arange(work.num_layers)[:, None]
        started = time.perf_counter()
        if work.open_ahead and request == work.first_request:
            client.open_put(tokens)
        for layer in range(work.num_layers):
            pages_written += int(client.put_layer(tokens, layer, data[layer]))
            if work.open_ahead and layer == 0 and request + 1 < stop:
                client.open_put(work.tokens(request + 1))  # as a scheduler that knows its next request
        seconds += time.perf_counter() - started
    return {
        "seconds": seconds,
        "bytes": pages_written * work.segment_bytes,
        "expected_bytes": work.requests * work.request_bytes,
        "span": (began, time.monotonic()),  # system-wide clock: concurrent workers' spans compare
    }


def get_run(work: Workload) -> dict[str, Any]:
    """Read every request back into one reused buffer; return the timed seconds, bytes read and bad stamps."""
    client = _client(work)
    out = _buffer("get", work.num_layers, work.pages_per_request, work.segment_bytes)
    pages_read = 0
    wrong = 0
    seconds = 0.0
    began = time.monotonic()
    for request in range(work.first_request, work.first_request + work.requests):
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
        "span": (began, time.monotonic()),
    }


def close_clients() -> None:
    for client in _clients.values():
        close = getattr(client, "close", None)
        if callable(close):
            close()
    _clients.clear()


# ---------------------------------------------------------------- control plane


@dataclass(frozen=True)
class ControlWorkload:
    master: str
    namespace: str
    pages: int  # pages per request (2048: a 32k-token prompt of 16-token pages)
    layers: int
    segment_bytes: int
    requests: int  # measured requests (one more, unmeasured, comes first)

    def tokens(self, first: int) -> np.ndarray:
        """A distinct prompt of ``pages`` 16-token pages, told apart by its first token."""
        tokens = np.arange(self.pages * 16, dtype=np.int64) % 50_000
        tokens[0] = first
        return tokens


def _ms(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64) * 1e3
    if not len(arr):
        return {"n": 0}
    return {
        "n": len(arr),
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "max_ms": float(arr.max()),
    }


def _instrument(client: Any, rpc_times: dict[str, list[float]], copy_times: list[float]) -> None:
    """Time every RPC (on the client's loop, from send to answer) and every data-plane write, in this process only."""
    master = client._master
    plain_acall = master.acall

    async def timed_acall(method: str, request: Any) -> Any:
        started = time.perf_counter()
        try:
            return await plain_acall(method, request)
        finally:
            rpc_times.setdefault(method, []).append(time.perf_counter() - started)

    master.acall = timed_acall
    selector = client._transports
    plain_for_node = selector.for_node

    def for_node(node: Any) -> Any:
        transport = plain_for_node(node)
        if not getattr(transport, "_bench_timed", False):
            plain_write = transport.write

            def write(batch: Any, plan: Any) -> Any:
                started = time.perf_counter()
                try:
                    return plain_write(batch, plan)
                finally:
                    copy_times.append(time.perf_counter() - started)

            transport.write = write
            transport._bench_timed = True
        return transport

    selector.for_node = for_node


def control_run(work: ControlWorkload) -> dict[str, Any]:
    """put_layer of ``pages`` pages, layer by layer, then match/acquire/get of the same prompt.

    Returns latency summaries: the RPCs as seen on the wire, each put_layer
    (first layer: OpenPut + copy + CommitLayer sent; middle layers: copy +
    CommitLayer sent; last layer: also waits for the session's commits), the
    copy inside it, and the lookups (key hashing + RPC + master lookup).
    """
    from kvstore.client import KVStoreClient

    cfg = kvconfig.load({"transport": "shm"}, environ={})
    client = KVStoreClient(work.master, namespace=work.namespace, config=cfg)
    try:
        client.create_namespace(page_size=16, num_layers=work.layers, segment_bytes=work.segment_bytes)
        rpc: dict[str, list[float]] = {}
        copies: list[float] = []
        _instrument(client, rpc, copies)
        data = np.full((work.pages, work.segment_bytes), 7, dtype=np.uint8)
        out = np.empty((work.layers, work.pages, work.segment_bytes), dtype=np.uint8)
        first: list[float] = []
        middle: list[float] = []
        last: list[float] = []
        beyond_first: list[float] = []
        beyond_middle: list[float] = []
        beyond_last: list[float] = []
        per_layer: list[float] = []
        match: list[float] = []
        acquire: list[float] = []
        get: list[float] = []
        first_ahead: list[float] = []
        beyond_first_ahead: list[float] = []
        for request in range(work.requests + 1):
            # the same request with its put opened ahead (KVStoreClient.open_put), answered before
            # layer 0 is ready (an engine's layer 0 computes meanwhile); only its first layer is kept
            tokens = work.tokens(300_000 + request)
            client.open_put(tokens).result()
            for layer in range(work.layers):
                copies.clear()
                started = time.perf_counter()
                written = client.put_layer(tokens, layer, data)
                if layer == 0 and request > 0:
                    first_ahead.append(time.perf_counter() - started)
                    beyond_first_ahead.append(first_ahead[-1] - sum(copies))
                if written != work.pages:
                    raise RuntimeError(f"control run: put_layer wrote {written} of {work.pages} pages")
        for request in range(work.requests + 1):
            tokens = work.tokens(200_000 + request)
            measured = request > 0
            if measured:
                rpc.clear()
            session_total = 0.0
            session_copy = 0.0
            for layer in range(work.layers):
                copies.clear()
                started = time.perf_counter()
                written = client.put_layer(tokens, layer, data)
                took = time.perf_counter() - started
                copy = sum(copies)
                session_total += took
                session_copy += copy
                if written != work.pages:
                    raise RuntimeError(f"control run: put_layer wrote {written} of {work.pages} pages")
                bucket, beyond = (
                    (first, beyond_first)
                    if layer == 0
                    else (last, beyond_last)
                    if layer == work.layers - 1
                    else (middle, beyond_middle)
                )
                if measured:
                    bucket.append(took)
                    beyond.append(took - copy)
            if measured:
                per_layer.append((session_total - session_copy) / work.layers)
            started = time.perf_counter()
            matched = client.match_prefix(tokens)
            if measured:
                match.append(time.perf_counter() - started)
            started = time.perf_counter()
            lease = client.acquire_prefix(tokens)
            if measured:
                acquire.append(time.perf_counter() - started)
            client.release(lease)
            started = time.perf_counter()
            hit = client.get_prefix(tokens, out=out)
            if measured:
                get.append(time.perf_counter() - started)
            if matched != work.pages * 16 or hit.num_pages != work.pages:
                raise RuntimeError(f"control run: matched {matched} tokens, read {hit.num_pages} pages")
        return {
            "pages": work.pages,
            "layers": work.layers,
            "segment_bytes": work.segment_bytes,
            "requests": work.requests,
            "rpc": {name: _ms(times) for name, times in rpc.items()},
            "put_layer_first": _ms(first),
            "put_layer_middle": _ms(middle),
            "put_layer_last": _ms(last),
            "beyond_copy_first": _ms(beyond_first),
            "put_layer_first_opened_ahead": _ms(first_ahead),
            "beyond_copy_first_opened_ahead": _ms(beyond_first_ahead),
            "beyond_copy_middle": _ms(beyond_middle),
            "beyond_copy_last": _ms(beyond_last),
            "beyond_copy_per_layer": _ms(per_layer),
            "match_prefix": _ms(match),
            "acquire_prefix": _ms(acquire),
            "get_prefix": _ms(get),
            "get_bytes": work.layers * work.pages * work.segment_bytes,
        }
    finally:
        client.close()


# ---------------------------------------------------------------- small-op latency


@dataclass(frozen=True)
class LatencyWorkload:
    master: str
    namespace: str
    transport: str
    segment_bytes: int
    samples: int


def latency_run(work: LatencyWorkload) -> dict[str, Any]:
    """get_prefix of one page of one layer (one segment), ``samples`` times: p50/p99 of the whole call."""
    from kvstore.client import KVStoreClient

    cfg = kvconfig.load({"transport": work.transport}, environ={})
    client = KVStoreClient(work.master, namespace=work.namespace, config=cfg)
    try:
        client.create_namespace(page_size=16, num_layers=1, segment_bytes=work.segment_bytes)
        tokens = np.arange(16, dtype=np.int64) + 300_000
        data = np.full((1, work.segment_bytes), 9, dtype=np.uint8)
        puts = []
        for i in range(min(work.samples, 200)):
            fresh = tokens + 1_000 * (i + 1)
            started = time.perf_counter()
            client.put_layer(fresh, 0, data)
            puts.append(time.perf_counter() - started)
        client.put_layer(tokens, 0, data)
        out = np.empty((1, 1, work.segment_bytes), dtype=np.uint8)
        for _ in range(20):  # warm: mapping, connections
            client.get_prefix(tokens, out=out)
        gets = []
        for _ in range(work.samples):
            started = time.perf_counter()
            hit = client.get_prefix(tokens, out=out)
            gets.append(time.perf_counter() - started)
            if hit.num_pages != 1:
                raise RuntimeError("latency run: the page went missing")
        return {
            "transport": work.transport,
            "segment_bytes": work.segment_bytes,
            "get": _ms(gets),
            "put": _ms(puts),
        }
    finally:
        client.close()
