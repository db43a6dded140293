"""Tensor-parallel writers fill one geometry namespace; readers ask for any head range.

Namespace: mha, 4 kv heads of 16 float16 values, 4-token pages, so a segment
is [K|V][4 heads][4 tokens][16] = 1024 bytes and a tp_size=2 shard 512 bytes:
[K|V][2 heads][4][16].  A page is complete (matchable) only once both ranks
committed every layer (invariant 3: no page with a missing head range).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.testing import get_layers, page_bytes, prompt, put_layers

PAGE = 4
LAYERS = 2
HEADS = 4
HEAD_BYTES = PAGE * 16 * 2  # one head of one half (K or V) in one segment
SEGMENT = 2 * HEADS * HEAD_BYTES
PAGES = 6


def _create(client_factory, cluster, namespace):
    c = client_factory(cluster, namespace)
    layout = c.create_namespace(
        page_size=PAGE, num_layers=LAYERS, kind="mha", kv_heads=HEADS, head_dim=16, dtype="float16"
    )
    assert layout.segment_bytes == SEGMENT
    return c


def _shards(seed: int) -> list[list[np.ndarray]]:
    """shards[rank][layer]: [PAGES, SEGMENT // 2] bytes of that rank's two heads."""
    return [
        [page_bytes(seed * 10 + rank * 4 + layer, PAGES, SEGMENT // 2) for layer in range(LAYERS)]
        for rank in range(2)
    ]


def _heads(shards: list[list[np.ndarray]], layer: int, begin: int, end: int) -> np.ndarray:
    """Heads [begin, end) of a layer as the canonical layout orders them: per half, heads in order."""
    per_rank = [s[layer].reshape(PAGES, 2, 2, HEAD_BYTES) for s in shards]  # [page, half, head, bytes]
    full = np.concatenate(per_rank, axis=2)  # [page, half, 4 heads, bytes]
    return full[:, :, begin:end, :].reshape(PAGES, -1)


def test_two_writer_processes_fill_all_heads(cluster, client, workers, namespace):
    c = _create(client, cluster, namespace)
    tokens = prompt(20, PAGES * PAGE)
    shards = _shards(20)
    addr = cluster.master_address
    rank0 = workers.submit("tp0", put_layers, addr, namespace, tokens, shards[0], tp_rank=0, tp_size=2)
    rank1 = workers.submit("tp1", put_layers, addr, namespace, tokens, shards[1], tp_rank=1, tp_size=2)
    assert rank0.result(60) == [PAGES] * LAYERS
    assert rank1.result(60) == [PAGES] * LAYERS
    assert c.match_prefix(tokens) == PAGES * PAGE

    pages, full = workers.run("reader", get_layers, addr, namespace, tokens)
    assert pages == PAGES
    for layer in range(LAYERS):
        np.testing.assert_array_equal(full[layer], _heads(shards, layer, 0, HEADS))

    # a decoder with tp 2 asks for its half of the heads
    for begin, end in ((0, 2), (2, 4), (1, 3)):
        pages, part = workers.run("reader", get_layers, addr, namespace, tokens, "tcp", heads=(begin, end))
        assert pages == PAGES
        for layer in range(LAYERS):
            np.testing.assert_array_equal(part[layer], _heads(shards, layer, begin, end))
    np.testing.assert_array_equal(c.get_prefix(tokens, heads=(0, 2)).layer(1), shards[0][1])
    np.testing.assert_array_equal(c.get_prefix(tokens, heads=(2, 4), layers=[0]).layer(0), shards[1][0])


def test_page_with_missing_head_range_is_not_matched(cluster, client, workers, namespace):
    c = _create(client, cluster, namespace)
    tokens = prompt(21, PAGES * PAGE)
    shards = _shards(21)
    addr = cluster.master_address
    assert (
        workers.run("tp0", put_layers, addr, namespace, tokens, shards[0], tp_rank=0, tp_size=2)
        == [PAGES] * 2
    )
    assert c.match_prefix(tokens) == 0  # rank 1's heads are missing
    assert c.get_prefix(tokens, heads=(0, 2)).num_pages == 0
    # the same rank again is "already stored": its head range is claimed
    assert workers.run("tp0", put_layers, addr, namespace, tokens, shards[0], tp_rank=0, tp_size=2) == [0] * 2
    assert (
        workers.run("tp1", put_layers, addr, namespace, tokens, shards[1], tp_rank=1, tp_size=2)
        == [PAGES] * 2
    )
    assert c.match_prefix(tokens) == PAGES * PAGE
    np.testing.assert_array_equal(c.get_prefix(tokens).layer(0), _heads(shards, 0, 0, HEADS))


def test_head_and_rank_ranges_are_checked(cluster, client, namespace):
    c = _create(client, cluster, namespace)
    tokens = prompt(22, PAGES * PAGE)
    with pytest.raises(KVStoreError) as err:
        c.get_prefix(tokens, heads=(0, HEADS + 1))
    assert err.value.code is ErrorCode.BAD_RANGE
    with pytest.raises(KVStoreError) as err:
        c.get_prefix(tokens, heads=(3, 3))
    assert err.value.code is ErrorCode.BAD_RANGE
    with pytest.raises(KVStoreError) as err:
        c.put_layer(tokens, 0, np.zeros((PAGES, SEGMENT // 2), np.uint8), tp_rank=2, tp_size=2)
    assert err.value.code is ErrorCode.BAD_RANGE
    with pytest.raises(KVStoreError) as err:
        c.put_layer(tokens, 0, np.zeros((PAGES, SEGMENT // 3), np.uint8), tp_rank=0, tp_size=3)  # 4 % 3 != 0
    assert err.value.code is ErrorCode.BAD_RANGE
