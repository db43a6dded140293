"""Layer streaming in the master core (kvstore.master.streams), without gRPC: a Master with fake nodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from kvstore import keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.master.core import Master
from kvstore.master.index import DOOMED
from kvstore.testing import master_in_process

MiB = 1 << 20
LAYERS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def _master() -> Master:
    master: Master = await master_in_process(
        [pb.RegionInfo(tier="dram", capacity_bytes=16 * MiB)],
        clock=Clock(),
        node_id="n0",
        read_lease_ms=5000,
        write_lease_ms=5000,
        quarantine_ms=500,
    )
    await master.create_namespace(
        pb.NamespaceSpec(name="ns", page_size=4, num_layers=LAYERS, segment_bytes=4096)
    )
    return master


def _keys(master: Master, pages: int, seed: int = 1) -> bytes:
    tokens = np.arange(seed * 1000, seed * 1000 + pages * 4)
    return keys.pack_keys(keys.page_keys(master.namespaces["ns"].root, tokens, 4))


def _commit(master: Master, session: int, layer: int, pages: int) -> None:
    master.commit_layer(session, np.array([layer]), np.zeros(pages, dtype=np.uint64))


def _progress(msg: pb.StreamPrefixUpdate) -> dict[int, int]:
    layers = np.frombuffer(msg.layers_ready, dtype="<u2").tolist()
    pages = np.frombuffer(msg.pages_ready, dtype="<u4").tolist()
    return dict(zip(layers, pages, strict=True))


async def _next(stream: AsyncIterator[pb.StreamPrefixUpdate]) -> pb.StreamPrefixUpdate:
    return await asyncio.wait_for(stream.__anext__(), 5.0)


def test_stream_reports_each_committed_layer() -> None:
    async def body() -> None:
        master = await _master()
        packed = _keys(master, 3)
        put = await master.open_put("ns", packed)
        _commit(master, put.session_id, 0, 3)
        stream = master.streams.stream("ns", packed, np.zeros(0, np.uint16))
        first = await _next(stream)
        assert first.code == "" and first.num_pages == 3 and first.lease_id
        assert _progress(first) == {0: 3} and not first.done
        assert len(np.frombuffer(first.placements.slot_offsets, "<u8")) == 3
        # the lease holds the pages being written; DescribeLease shows no whole page yet
        assert master.describe_lease(first.lease_id).num_pages == 0
        for layer in (2, 1):
            _commit(master, put.session_id, layer, 3)
            msg = await _next(stream)
            assert _progress(msg) == {layer: 3} and not msg.done
        _commit(master, put.session_id, 3, 3)
        last = await _next(stream)
        assert _progress(last) == {3: 3} and last.done
        with pytest.raises(StopAsyncIteration):
            await _next(stream)
        # a finished stream leaves its lease to the client, who reads, then releases it
        assert master.describe_lease(first.lease_id).num_pages == 3
        assert master.release_lease(first.lease_id)

    asyncio.run(body())


def test_stream_of_chosen_layers_and_complete_pages() -> None:
    async def body() -> None:
        master = await _master()
        packed = _keys(master, 4)
        put = await master.open_put("ns", packed[: 2 * 16])
        for layer in range(LAYERS):
            _commit(master, put.session_id, layer, 2)
        second = await master.open_put("ns", packed[2 * 16 :], parent_key=packed[16:32])
        stream = master.streams.stream("ns", packed, np.array([3, 1], dtype=np.uint16))
        first = await _next(stream)
        assert first.num_pages == 4 and _progress(first) == {3: 2, 1: 2}
        _commit(master, second.session_id, 0, 2)  # not wanted: no message
        _commit(master, second.session_id, 1, 2)
        assert _progress(await _next(stream)) == {1: 4}
        _commit(master, second.session_id, 2, 2)
        _commit(master, second.session_id, 3, 2)
        msg = await _next(stream)
        assert _progress(msg) == {3: 4} and msg.done
        await stream.aclose()

    asyncio.run(body())


def test_stream_waits_for_page_zero() -> None:
    async def body() -> None:
        master = await _master()
        packed = _keys(master, 2)
        stream = master.streams.stream("ns", packed, np.zeros(0, np.uint16), wait_ms=3000)
        first_task = asyncio.ensure_future(_next(stream))
        await asyncio.sleep(0.05)
        assert not first_task.done()
        put = await master.open_put("ns", packed)
        first = await first_task
        assert first.num_pages == 2 and not first.done and _progress(first) == {}
        for layer in range(LAYERS):
            _commit(master, put.session_id, layer, 2)
            await _next(stream)
        await stream.aclose()

        # nothing comes: an empty, finished stream once the wait is over
        other = master.streams.stream("ns", _keys(master, 1, seed=9), np.zeros(0, np.uint16), wait_ms=50)
        empty = await _next(other)
        assert empty.num_pages == 0 and empty.done and not empty.lease_id

    asyncio.run(body())


def test_aborted_writer_shrinks_the_stream_and_pages_wait_for_the_lease() -> None:
    async def body() -> None:
        master = await _master()
        packed = _keys(master, 3)
        put = await master.open_put("ns", packed)
        _commit(master, put.session_id, 0, 3)
        stream = master.streams.stream("ns", packed, np.zeros(0, np.uint16))
        first = await _next(stream)
        rows = master.index.lookup(master.namespaces["ns"].ns_id, packed)
        assert master.abort_put(put.session_id) == 0  # all three are held by the stream's lease
        msg = await _next(stream)
        assert msg.num_pages == 0 and msg.done
        assert (master.index.state[rows] == DOOMED).all()
        # a new writer of the same keys gets fresh pages
        again = await master.open_put("ns", packed)
        assert np.frombuffer(again.status, np.uint8).tolist() == [pb.PAGE_NEW] * 3
        assert master.release_lease(first.lease_id)
        assert (master.index.state[rows] != DOOMED).all()  # freed with the lease
        with pytest.raises(StopAsyncIteration):
            await _next(stream)

    asyncio.run(body())


def test_cancelled_stream_releases_its_lease() -> None:
    async def body() -> None:
        master = await _master()
        packed = _keys(master, 2)
        await master.open_put("ns", packed)
        stream = master.streams.stream("ns", packed, np.zeros(0, np.uint16))
        first = await _next(stream)
        assert len(master.leases) == 1
        pending = asyncio.ensure_future(_next(stream))
        await asyncio.sleep(0.01)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await stream.aclose()
        assert len(master.leases) == 0 and len(master.streams) == 0
        with pytest.raises(KVStoreError) as err:
            master.describe_lease(first.lease_id)
        assert err.value.code is ErrorCode.LEASE_NOT_FOUND

    asyncio.run(body())


def test_released_lease_ends_the_stream() -> None:
    async def body() -> None:
        master = await _master()
        packed = _keys(master, 2)
        await master.open_put("ns", packed)
        stream = master.streams.stream("ns", packed, np.zeros(0, np.uint16))
        first = await _next(stream)
        assert master.release_lease(first.lease_id)
        with pytest.raises(KVStoreError) as err:
            await _next(stream)
        assert err.value.code is ErrorCode.LEASE_NOT_FOUND

    asyncio.run(body())


def test_bad_layers_are_refused() -> None:
    async def body() -> None:
        master = await _master()
        packed = _keys(master, 1)
        for layers, code in (([LAYERS], ErrorCode.BAD_RANGE), ([1, 1], ErrorCode.BAD_RANGE)):
            with pytest.raises(KVStoreError) as err:
                await _next(master.streams.stream("ns", packed, np.array(layers, dtype=np.uint16)))
            assert err.value.code is code
        with pytest.raises(KVStoreError) as err:
            await _next(master.streams.stream("nope", packed, np.zeros(0, np.uint16)))
        assert err.value.code is ErrorCode.NAMESPACE_NOT_FOUND

    asyncio.run(body())
