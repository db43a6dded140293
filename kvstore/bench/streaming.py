"""Layer streaming, writer and reader in separate processes (issue 5, "Streaming" benchmark).

A writer process puts ``layers`` layers of one prompt, one put_layer after the
other; a reader process has opened a layer stream on the same prompt before the
writer's OpenPut (``wait_ms``) and reads each layer as soon as it is committed.
Reported: how long after the writer's last commit returned the reader had every
layer in its buffer (the streaming lag), beside the time one layer's read takes
on its own (get_prefix of one layer): the target is a lag under one layer's
transfer time.

The same two functions drive ``tests/integration/test_streaming.py``: with an
``acks`` queue the writer waits, after each layer, until the reader says it got
that layer, so a test proves by events (no timing) that each layer reaches the
reader before the next one is written.  ``hold_after`` makes the writer stop
there and wait to be killed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore import config as kvconfig

ACK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StreamWork:
    master: str
    namespace: str
    seed: int
    pages: int
    layers: int
    segment_bytes: int
    page_tokens: int = 16
    transport: str = "auto"

    def tokens(self) -> np.ndarray:
        tokens = np.arange(self.pages * self.page_tokens, dtype=np.int64) % 50_000
        tokens[0] = 200_000 + self.seed  # distinct first page per seed
        return tokens

    def layer_bytes(self, layer: int) -> np.ndarray:
        """``[pages, segment_bytes]`` of one layer; any process rebuilds the same bytes."""
        return np.random.default_rng(self.seed * 1_000 + layer).integers(
            0, 256, (self.pages, self.segment_bytes), dtype=np.uint8
        )


def _client(work: StreamWork) -> Any:
    from kvstore.client import KVStoreClient

    cfg = kvconfig.load({"transport": work.transport}, environ={})
    return KVStoreClient(work.master, namespace=work.namespace, config=cfg)


def create_namespace(work: StreamWork) -> None:
    client = _client(work)
    try:
        client.create_namespace(
            page_size=work.page_tokens, num_layers=work.layers, segment_bytes=work.segment_bytes
        )
    finally:
        client.close()


def stream_writer(
    work: StreamWork, events: Any = None, acks: Any = None, hold_after: int | None = None
) -> dict[str, Any]:
    """Put every layer in order; ``events`` gets ("written", layer, unix time) after each put_layer returns.

    ``acks``: wait for the reader to hand back each layer's number before the
    next one.  ``hold_after``: after that many layers, report ("holding", n) and
    sleep until killed.
    """
    client = _client(work)
    tokens = work.tokens()
    data = [work.layer_bytes(layer) for layer in range(work.layers)]  # built before the clock
    written: list[int] = []
    commit_times: list[float] = []
    steps: list[tuple[str, int]] = []  # ("put", layer) / ("ack", layer), in the order they happened here
    try:
        for layer in range(work.layers):
            if hold_after is not None and layer == hold_after:
                if events is not None:
                    events.put(("holding", layer))
                while True:  # the parent SIGKILLs this process
                    time.sleep(3600)
            steps.append(("put", layer))
            written.append(int(client.put_layer(tokens, layer, data[layer])))
            commit_times.append(time.time())
            if events is not None:
                events.put(("written", layer, commit_times[-1]))
            if acks is not None:
                got = acks.get(timeout=ACK_TIMEOUT_S)
                if got != layer:
                    raise RuntimeError(f"reader acknowledged layer {got}, expected {layer}")
                steps.append(("ack", layer))
    finally:
        client.close()
    return {"written": written, "commit_times": commit_times, "steps": steps}


def stream_reader(
    work: StreamWork,
    events: Any = None,
    acks: Any = None,
    wait_ms: int = 30_000,
    lease_ms: int = 60_000,
    time_single: int = 0,
    warm_up: StreamWork | None = None,
) -> dict[str, Any]:
    """Stream every layer; check its bytes; ``events`` gets ("read", layer, pages, unix time) per layer.

    ``events`` first gets ("streaming",) just before the stream is opened.
    ``time_single``: afterwards, time that many get_prefix calls of one layer.
    ``warm_up``: read that (stored) prompt first, as a long-lived engine has mapped the pool already.
    """
    client = _client(work)
    tokens = work.tokens()
    if warm_up is not None:
        client.get_prefix(warm_up.tokens())
    out = np.empty((work.layers, work.pages, work.segment_bytes), dtype=np.uint8)
    out.fill(0)  # faulted in before the clock, as an engine's KV buffers are
    order: list[int] = []
    pages: list[int] = []
    read_times: list[float] = []
    wrong: list[int] = []
    try:
        if events is not None:
            events.put(("streaming",))
        with client.get_prefix_stream(tokens, out=out, wait_ms=wait_ms, lease_ms=lease_ms) as stream:
            leased = stream.num_pages
            for ready in stream:
                read_times.append(time.time())
                order.append(ready.layer)
                pages.append(ready.num_pages)
                if events is not None:
                    events.put(("read", ready.layer, ready.num_pages, read_times[-1]))
                if acks is not None:
                    acks.put(ready.layer)
            final_pages = stream.num_pages
            lease_id = stream.lease_id
        # checked afterwards: building the expected bytes must not delay the next layer
        for layer, count in zip(order, pages, strict=True):
            if not np.array_equal(out[layer, :count], work.layer_bytes(layer)[:count]):
                wrong.append(layer)
        single: list[float] = []
        if time_single:
            one = np.empty((1, work.pages, work.segment_bytes), dtype=np.uint8)
            for _ in range(time_single):
                started = time.perf_counter()
                hit = client.get_prefix(tokens, layers=[work.layers - 1], out=one)
                single.append(time.perf_counter() - started)
                if hit.num_pages != work.pages:
                    raise RuntimeError(f"single-layer read found {hit.num_pages} of {work.pages} pages")
    finally:
        client.close()
    return {
        "order": order,
        "pages": pages,
        "read_times": read_times,
        "wrong": wrong,
        "leased_pages": leased,
        "num_pages": final_pages,
        "lease_id": lease_id,
        "single_layer_s": single,
    }


def run_streaming(
    master: str, namespace: str, writer_pool: Any, reader_pool: Any, quick: bool, timeout_s: float
) -> dict[str, Any]:
    """The bench part: returns the lag after the last commit and one layer's read time, in ms."""
    from kvstore.testing import spawn_context, submit

    work = StreamWork(
        master,
        namespace,
        seed=int(time.time()) % 100_000,
        pages=16 if quick else 64,
        layers=32,
        segment_bytes=64 << 10,
    )
    submit(writer_pool, create_namespace, work).result(timeout_s)
    with spawn_context().Manager() as manager:
        events = manager.Queue()
        warm = StreamWork(master, namespace, work.seed + 1, 1, work.layers, work.segment_bytes)
        submit(writer_pool, stream_writer, warm).result(timeout_s)
        reader = submit(reader_pool, stream_reader, work, events, None, 60_000, 120_000, 5, warm)
        # the reader's stream waits (wait_ms) for the writer's OpenPut: start writing once it is opening
        if events.get(timeout=timeout_s) != ("streaming",):
            raise RuntimeError("the reader did not start streaming")
        writer = submit(writer_pool, stream_writer, work)
        wrote = writer.result(timeout_s)
        got = reader.result(timeout_s)
    if got["wrong"] or got["num_pages"] != work.pages or len(got["order"]) != work.layers:
        raise RuntimeError(
            f"streamed {len(got['order'])} layers of {got['num_pages']} pages, wrong bytes in {got['wrong']}"
        )
    last_commit = wrote["commit_times"][-1]
    all_read = got["read_times"][-1]
    single_ms = statistics.median(got["single_layer_s"]) * 1000.0
    lags = [r - c for r, c in zip(got["read_times"], wrote["commit_times"], strict=False)]
    return {
        "layers": work.layers,
        "pages": work.pages,
        "segment_bytes": work.segment_bytes,
        "layer_bytes": work.pages * work.segment_bytes,
        "lag_after_last_commit_ms": (all_read - last_commit) * 1000.0,
        "one_layer_read_ms": single_ms,
        "write_all_layers_ms": (wrote["commit_times"][-1] - wrote["commit_times"][0]) * 1000.0,
        "median_layer_lag_ms": statistics.median(lags) * 1000.0 if lags else float("nan"),
        "order": got["order"],
    }
