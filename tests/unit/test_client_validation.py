"""Client-side validation: bad input is refused locally, before any RPC.

The client points at a port where nothing listens; the namespace layout is
primed as if create_namespace had run earlier, so any call that reached the
network would fail with UNAVAILABLE instead of the error asserted here.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from kvstore import ErrorCode, KVStoreClient, KVStoreError
from kvstore._proto import kvstore_pb2 as pb

PAGE = 4
LAYERS = 3
KV_HEADS = 4
HEAD_DIM = 8
SEGMENT = 2 * KV_HEADS * PAGE * HEAD_DIM * 2  # mha, float16


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def client() -> Iterator[KVStoreClient]:
    c = KVStoreClient(dead_address(), namespace="test/validation", rpc_timeout_ms=2000)
    spec = pb.NamespaceSpec(name="test/validation", page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
    spec.geometry.CopyFrom(pb.Geometry(kind="mha", kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="float16"))
    c._remember(spec)  # as if create_namespace had run
    yield c
    c.close()


def code_of(excinfo: pytest.ExceptionInfo[KVStoreError]) -> ErrorCode:
    return excinfo.value.code


TOKENS = np.arange(10)  # two full pages and a tail
FULL_SHARD = SEGMENT


@pytest.mark.parametrize("tokens", [[], [-1, 2, 3, 4], [[1, 2, 3, 4]], [1.5, 2, 3, 4], [0, 1 << 31, 2, 3]])
def test_bad_tokens_everywhere(client: KVStoreClient, tokens: object) -> None:
    calls = [
        lambda: client.put_layer(tokens, 0, np.zeros(2 * FULL_SHARD, np.uint8)),
        lambda: client.get_prefix(tokens),
        lambda: client.match_prefix(tokens),
        lambda: client.acquire_prefix(tokens),
        lambda: client.put_extra(tokens, "first", b"x"),
        lambda: client.get_extra(tokens, "first"),
        lambda: client.abort(tokens),
    ]
    for call in calls:
        with pytest.raises(KVStoreError) as info:
            call()
        assert code_of(info) is ErrorCode.BAD_TOKENS


def test_bad_tokens_need_no_namespace_layout() -> None:
    with KVStoreClient(dead_address(), namespace="never/fetched", rpc_timeout_ms=2000) as c:
        with pytest.raises(KVStoreError) as info:
            c.put_layer([-5], 0, b"")
        assert code_of(info) is ErrorCode.BAD_TOKENS


def test_kv_size_mismatch_says_expected_and_got(client: KVStoreClient) -> None:
    with pytest.raises(KVStoreError) as info:
        client.put_layer(TOKENS, 0, np.zeros(2 * FULL_SHARD - 2, np.uint8))
    assert code_of(info) is ErrorCode.BAD_SIZE
    assert str(2 * FULL_SHARD) in info.value.message and str(2 * FULL_SHARD - 2) in info.value.message
    # a tp rank writes only its heads: the full-segment tensor is the wrong size for rank 1 of 2
    with pytest.raises(KVStoreError) as info:
        client.put_layer(TOKENS, 0, np.zeros((2, FULL_SHARD), np.uint8), tp_rank=1, tp_size=2)
    assert code_of(info) is ErrorCode.BAD_SIZE


def test_any_dtype_of_the_right_size_passes_validation(client: KVStoreClient) -> None:
    # float16 [pages, K|V, heads, page, dim]: right size, so validation passes and the RPC fails
    kv = np.zeros((2, 2, KV_HEADS, PAGE, HEAD_DIM), dtype=np.float16)
    with pytest.raises(KVStoreError) as info:
        client.put_layer(TOKENS, 0, kv)
    assert code_of(info) in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE)


def test_out_validation(client: KVStoreClient) -> None:
    shard = FULL_SHARD
    with pytest.raises(KVStoreError) as info:
        client.get_prefix(TOKENS, out=np.zeros(LAYERS * 2 * shard + 1, np.uint8))
    assert code_of(info) is ErrorCode.BAD_SIZE
    with pytest.raises(KVStoreError) as info:
        client.get_prefix(TOKENS, layers=[1], out=bytes(2 * shard))
    assert code_of(info) is ErrorCode.INVALID_ARGUMENT  # not writable
    strided = np.zeros((2, 2 * shard), np.uint8)[:, ::2]
    with pytest.raises(KVStoreError) as info:
        client.get_prefix(TOKENS, layers=[1], out=strided)
    assert code_of(info) is ErrorCode.INVALID_ARGUMENT  # not contiguous
    half = (KV_HEADS // 2) * 2 * PAGE * HEAD_DIM * 2
    with pytest.raises(KVStoreError) as info:
        client.get_prefix(TOKENS, layers=[0, 2], heads=(0, 2), out=np.zeros(2 * 2 * half + 8, np.uint8))
    assert code_of(info) is ErrorCode.BAD_SIZE
    assert str(2 * 2 * half) in info.value.message


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.put_layer(TOKENS, LAYERS, np.zeros(2 * FULL_SHARD, np.uint8)),
        lambda c: c.put_layer(TOKENS, -1, np.zeros(2 * FULL_SHARD, np.uint8)),
        lambda c: c.put_layer(TOKENS, 0, np.zeros(2 * FULL_SHARD, np.uint8), tp_rank=2, tp_size=2),
        lambda c: c.put_layer(TOKENS, 0, np.zeros(2 * FULL_SHARD, np.uint8), tp_rank=0, tp_size=3),
        lambda c: c.put_layers(TOKENS, [1, 1], np.zeros(4 * FULL_SHARD, np.uint8)),
        lambda c: c.get_prefix(TOKENS, layers=[0, LAYERS]),
        lambda c: c.get_prefix(TOKENS, layers=[]),
        lambda c: c.get_prefix(TOKENS, heads=(0, KV_HEADS + 1)),
        lambda c: c.get_prefix(TOKENS, heads=(2, 2)),
    ],
)
def test_bad_ranges(client: KVStoreClient, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KVStoreError) as info:
        call(client)
    assert code_of(info) is ErrorCode.BAD_RANGE


def test_less_than_a_page_needs_no_rpc(client: KVStoreClient) -> None:
    short = [1, 2, 3]
    assert client.put_layer(short, 0, b"") == 0
    hit = client.get_prefix(short)
    assert (hit.num_pages, hit.num_tokens, hit.data.shape) == (0, 0, (LAYERS, 0, FULL_SHARD))
    assert not hit
    assert client.match_prefix(short) == 0
    lease = client.acquire_prefix(short)
    assert (lease.lease_id, lease.num_pages) == ("", 0)
    assert client.release(lease) is False
    with pytest.raises(KVStoreError) as info:
        client.put_layer(short, 0, b"\0")  # nothing to write, yet a byte was given
    assert code_of(info) is ErrorCode.BAD_SIZE


def test_calls_that_need_the_master_fail_cleanly(client: KVStoreClient) -> None:
    with pytest.raises(KVStoreError) as info:
        client.match_prefix(TOKENS)
    assert code_of(info) in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE)


def test_namespace_validation_is_local() -> None:
    with KVStoreClient(dead_address(), namespace="t/ns", rpc_timeout_ms=2000) as c:
        with pytest.raises(KVStoreError) as info:
            c.create_namespace(page_size=0, num_layers=2, segment_bytes=64)
        assert code_of(info) is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(KVStoreError) as info:
            c.create_namespace(16, 2, kind="mha", kv_heads=8, head_dim=128, dtype="float64")
        assert code_of(info) is ErrorCode.INVALID_ARGUMENT
    with KVStoreClient(dead_address(), rpc_timeout_ms=2000) as c, pytest.raises(KVStoreError) as info:
        c.match_prefix(TOKENS)
    assert code_of(info) is ErrorCode.INVALID_ARGUMENT  # no namespace


def test_options() -> None:
    with pytest.raises(TypeError):
        KVStoreClient(dead_address(), namespace="t", no_such_setting=1)
    with pytest.raises(KVStoreError) as info:
        KVStoreClient(dead_address(), namespace="t", transport="rdma")
    assert code_of(info) is ErrorCode.INVALID_ARGUMENT


def test_closed_client_refuses(client: KVStoreClient) -> None:
    client.close()
    client.close()
    with pytest.raises(KVStoreError) as info:
        client.match_prefix(TOKENS)
    assert code_of(info) is ErrorCode.UNAVAILABLE


def test_sync_client_inside_a_running_event_loop(client: KVStoreClient) -> None:
    async def engine() -> ErrorCode:
        # An engine's coroutine calling the sync client: its own loop is not needed, so no deadlock.
        try:
            client.match_prefix(TOKENS)
        except KVStoreError as exc:
            return exc.code
        return ErrorCode.INTERNAL

    assert asyncio.run(engine()) in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE)
