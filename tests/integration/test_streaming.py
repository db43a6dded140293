"""Layer streaming end to end (issue 5): a reader process gets each layer as soon as the writer commits it.

Causality is proven by events, not timings: the writer waits, after each layer,
until the reader hands that layer's number back, so the put cannot finish
unless every layer reached the reader before the next one was written.  The
reader opens its stream before the writer's OpenPut (``wait_ms``).  A writer
killed mid-way makes the stream report the pages that will never be ready
(``num_pages`` drops), without a hang; the lease goes and the pages are
reclaimed.  Bad input gets a status in the stream and nothing else is disturbed.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from unittest import mock

import grpc
import numpy as np
import pytest

from kvstore import keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.bench.streaming import StreamWork, stream_reader, stream_writer
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.testing import check_serves, spawn_context, wait_for

SLOT = 64 << 10  # every namespace here has 64 KiB pages (segment = SLOT / layers): one slot size, one arena
PAGE = 16


def _work(cluster, namespace: str, seed: int, pages: int, layers: int, transport: str = "auto") -> StreamWork:
    return StreamWork(cluster.master_address, namespace, seed, pages, layers, SLOT // layers, PAGE, transport)


def _namespace_bytes(cluster, namespace: str) -> int:
    return sum(ns.bytes for ns in cluster.stats().namespaces if ns.name == namespace)


@pytest.mark.parametrize(("transport", "layers"), [("shm", 16), ("tcp", 8)])
def test_reader_gets_each_layer_before_the_next_is_written(cluster, client, namespace, transport, layers):
    client(cluster, namespace, create=(PAGE, layers, SLOT // layers))
    work = _work(cluster, namespace, seed=11, pages=5, layers=layers, transport=transport)
    ctx = spawn_context()
    events, acks = ctx.Queue(), ctx.Queue()
    results = ctx.Queue()
    reader = ctx.Process(target=_run_reader, args=(work, events, acks, results), daemon=True)
    writer = ctx.Process(target=_run_writer, args=(work, events, acks, results), daemon=True)
    reader.start()
    try:
        assert events.get(timeout=60) == ("streaming",)  # the reader asks before the writer's OpenPut
        writer.start()
        seen = []
        while len(seen) < 2 * layers:
            seen.append(events.get(timeout=60))
        outcomes = dict(results.get(timeout=60) for _ in range(2))
    finally:
        for proc in (reader, writer):
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    got = outcomes["reader"]
    assert got["wrong"] == [] and got["order"] == list(range(layers))
    assert got["pages"] == [5] * layers and got["num_pages"] == 5
    assert outcomes["writer"]["written"] == [5] * layers
    # Every layer reached the reader (bytes checked) before the next one was written: the writer
    # waited for the reader's ack of each layer, so without streaming it could not have gone past
    # layer 0 (the prefix is complete only after the last layer).
    expected = [step for layer in range(layers) for step in (("put", layer), ("ack", layer))]
    assert [tuple(step) for step in outcomes["writer"]["steps"]] == expected
    assert [e for e in seen if e[0] == "read"][-1][1] == layers - 1
    wait_for(lambda: cluster.stats().active_read_leases == 0, 10, "the stream's lease to be released")


def _run_reader(work, events, acks, results) -> None:
    results.put(("reader", stream_reader(work, events, acks)))


def _run_writer(work, events, acks, results) -> None:
    results.put(("writer", stream_writer(work, events, acks)))


def _run_holder(work, events, hold_after) -> None:
    stream_writer(work, events, None, hold_after)


def test_killed_writer_ends_the_stream_with_the_unfinished_pages(cluster, client, namespace):
    layers = 8
    c = client(cluster, namespace, create=(PAGE, layers, SLOT // layers))
    work = _work(cluster, namespace, seed=12, pages=4, layers=layers)
    ctx = spawn_context()
    events = ctx.Queue()
    holder = ctx.Process(target=_run_holder, args=(work, events, 3), daemon=True)
    holder.start()
    try:
        for layer in range(3):
            assert events.get(timeout=60)[:2] == ("written", layer)
        assert events.get(timeout=60) == ("holding", 3)
        out = np.zeros((layers, work.pages, work.segment_bytes), dtype=np.uint8)
        with c.get_prefix_stream(work.tokens(), out=out, lease_ms=30_000) as stream:
            assert stream.num_pages == 4 and stream.lease_id
            for layer in range(3):  # committed before the stream began: ready at once
                ready = stream.wait_layer(layer)
                assert ready.num_pages == 4
                np.testing.assert_array_equal(ready.data, work.layer_bytes(layer))
            holder.kill()
            holder.join(10)
            assert holder.exitcode == -signal.SIGKILL
            # the session expires (2 s write lease): layers 3.. will never come for any page
            rest = list(stream)  # each layer once: 0-2 (waited for above), then 3-5 with no pages
            assert [r.layer for r in rest] == list(range(layers))
            assert [r.num_pages for r in rest] == [4, 4, 4] + [0] * (layers - 3)
            assert stream.num_pages == 0
    finally:
        if holder.is_alive():
            holder.kill()
    wait_for(lambda: cluster.stats().active_read_leases == 0, 10, "the stream's lease to end")
    wait_for(lambda: _namespace_bytes(cluster, namespace) == 0, 10, "the doomed pages to be reclaimed")
    check_serves(cluster)


def test_closed_stream_releases_its_lease(cluster, client, namespace):
    layers = 8
    c = client(cluster, namespace, create=(PAGE, layers, SLOT // layers))
    work = _work(cluster, namespace, seed=13, pages=3, layers=layers)
    tokens = work.tokens()
    assert c.put_layer(tokens, 0, work.layer_bytes(0)) == 3  # the put goes on: layers 1.. not yet
    stream = c.get_prefix_stream(tokens, lease_ms=30_000)
    assert stream.num_pages == 3
    first = next(stream)
    assert first.layer == 0
    np.testing.assert_array_equal(first.data, work.layer_bytes(0))
    assert cluster.stats().active_read_leases == 1
    stream.close()
    wait_for(lambda: cluster.stats().active_read_leases == 0, 10, "the closed stream's lease to go")
    with pytest.raises(KVStoreError) as err:
        cluster.call(cluster.kvstore_stub.DescribeLease, pb.DescribeLeaseRequest(lease_id=stream.lease_id))
    assert err.value.code is ErrorCode.LEASE_NOT_FOUND
    # the writer is not disturbed: it finishes and the prefix is matched
    for layer in range(1, layers):
        c.put_layer(tokens, layer, work.layer_bytes(layer))
    assert c.match_prefix(tokens) == 3 * PAGE


def _stream_statuses(cluster, request: pb.StreamPrefixRequest) -> list[pb.StreamPrefixUpdate]:
    channel = grpc.insecure_channel(cluster.master_address)
    try:
        from kvstore._proto import kvstore_pb2_grpc as pb_grpc

        return list(pb_grpc.KVStoreStub(channel).StreamPrefix(request, timeout=10))
    finally:
        channel.close()


def test_bad_stream_requests_get_a_status(cluster, client, namespace):
    client(cluster, namespace, create=(PAGE, 2, SLOT // 2))
    key = b"k" * 16
    cases = [
        (pb.StreamPrefixRequest(namespace="test/none-such", keys=key), ErrorCode.NAMESPACE_NOT_FOUND),
        (pb.StreamPrefixRequest(namespace=namespace, keys=key[:15]), ErrorCode.BAD_KEYS),
        (pb.StreamPrefixRequest(namespace=namespace, keys=b""), ErrorCode.BAD_KEYS),
        (pb.StreamPrefixRequest(namespace=namespace, keys=key * 70_000), ErrorCode.TOO_LARGE),
        (pb.StreamPrefixRequest(namespace=namespace, keys=key, layers=b"\x05\x00"), ErrorCode.BAD_RANGE),
        (pb.StreamPrefixRequest(namespace=namespace, keys=key, layers=b"\x05"), ErrorCode.INVALID_ARGUMENT),
        (pb.StreamPrefixRequest(namespace="", keys=key), ErrorCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        updates = _stream_statuses(cluster, request)
        assert len(updates) == 1 and updates[0].code == code.name, (code, updates)
        assert updates[0].message
    # a stream of nothing stored, no wait: an empty finished stream
    [empty] = _stream_statuses(cluster, pb.StreamPrefixRequest(namespace=namespace, keys=key))
    assert empty.code == "" and empty.done and empty.num_pages == 0
    c = client(cluster, namespace)
    with pytest.raises(KVStoreError) as err:
        c.get_prefix_stream(np.arange(PAGE), layers=[0, 0])
    assert err.value.code is ErrorCode.BAD_RANGE
    stream = c.get_prefix_stream(np.arange(2 * PAGE), wait_ms=0)
    assert stream.num_pages == 0 and [r.num_pages for r in stream] == [0, 0]
    check_serves(cluster)


def test_put_layer_async_and_flush(cluster, client, namespace):
    layers = 8
    c = client(cluster, namespace, create=(PAGE, layers, SLOT // layers))
    work = _work(cluster, namespace, seed=14, pages=4, layers=layers)
    tokens = work.tokens()
    data = [work.layer_bytes(layer) for layer in range(layers)]
    digests = []
    real_digest = keys.sequence_digest

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        digests.append(threading.current_thread().name)
        return real_digest(*args, **kwargs)

    with mock.patch.object(keys, "sequence_digest", counted):
        futures = [c.put_layer_async(tokens, layer, data[layer]) for layer in range(layers)]
        c.flush(timeout=60)
    assert [f.result() for f in futures] == [4] * layers
    # the session key is worked out once per call, on the caller's thread: the put worker reuses it
    assert digests == [threading.current_thread().name] * layers
    hit = c.get_prefix(tokens)
    assert hit.num_pages == 4
    for layer in range(layers):
        np.testing.assert_array_equal(hit.layer(layer), data[layer])

    # an error reaches the future and flush; later layers of that sequence are not written
    other = _work(cluster, namespace, seed=15, pages=4, layers=layers).tokens()
    good = c.put_layer_async(other, 0, data[0])
    bad = c.put_layer_async(other, 1, data[1][:2])  # wrong size
    after = c.put_layer_async(other, 2, data[2])
    with pytest.raises(KVStoreError) as err:
        c.flush(timeout=60)
    assert err.value.code is ErrorCode.BAD_SIZE
    assert good.result() == 4
    assert isinstance(bad.exception(), KVStoreError)
    assert after.exception() is not None and after.exception().code is ErrorCode.SESSION_NOT_FOUND
    c.abort(other)
    c.flush(timeout=10)  # nothing pending: no error
    assert c.match_prefix(other) == 0


def test_async_client_streams_and_puts(cluster, namespace):
    from kvstore.client import AsyncKVStoreClient

    layers = 8
    work = _work(cluster, namespace, seed=16, pages=3, layers=layers)
    tokens = work.tokens()

    async def body() -> list[int]:
        async with (
            AsyncKVStoreClient(cluster.master_address, namespace) as writer,
            AsyncKVStoreClient(cluster.master_address, namespace) as reader,
        ):
            await writer.create_namespace(page_size=PAGE, num_layers=layers, segment_bytes=SLOT // layers)
            first = writer.put_layer_async(tokens, 0, work.layer_bytes(0))
            assert await first == 3
            stream = await reader.get_prefix_stream(tokens, lease_ms=30_000)
            assert stream.num_pages == 3
            order = []
            async with stream:
                for layer in range(1, layers):
                    writer.put_layer_async(tokens, layer, work.layer_bytes(layer))
                got = await stream.wait_layer(layers - 1)
                np.testing.assert_array_equal(got.data, work.layer_bytes(layers - 1))
                async for ready in stream:
                    order.append(ready.layer)
                    np.testing.assert_array_equal(ready.data, work.layer_bytes(ready.layer))
            await writer.flush()
            return order

    order = asyncio.run(body())
    assert sorted(order) == list(range(layers))
