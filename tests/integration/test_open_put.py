"""KVStoreClient.open_put: a put session opened ahead, in the background, before the first layer.

Real master and node processes.  A put session holds its new pages as being
written, so a second session for the same tokens would be told to skip them:
a put_layer that writes every page after open_put proves it used the session
opened ahead.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvstore import AsyncKVStoreClient, ErrorCode, KVStoreError
from kvstore.keys import TokenSequence
from kvstore.testing import page_bytes, prompt

PAGE = 16
LAYERS = 3
SEGMENT = 4096
GEOMETRY = (PAGE, LAYERS, SEGMENT)  # client(..., create=GEOMETRY): page_size, num_layers, segment_bytes


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_layers_go_into_the_session_opened_ahead(cluster, client, namespace, transport):
    writer = client(cluster, namespace, create=GEOMETRY, transport=transport)
    tokens = TokenSequence(prompt(1, 6 * PAGE + 3))
    opened = writer.open_put(tokens)
    layers = [page_bytes(10 + layer, 6, SEGMENT) for layer in range(LAYERS)]
    # at once: the first layer finds the open on its way and waits for it
    assert [writer.put_layer(tokens, layer, layers[layer]) for layer in range(LAYERS)] == [6] * LAYERS
    assert opened.result(10) == 6
    hit = client(cluster, namespace, transport=transport).get_prefix(tokens)
    assert hit.num_pages == 6
    for layer in range(LAYERS):
        np.testing.assert_array_equal(hit.layer(layer), layers[layer])


def test_opening_twice_and_opening_stored_pages(cluster, client, namespace):
    writer = client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(2, 4 * PAGE)
    first, second = writer.open_put(tokens), writer.open_put(tokens)  # one session, one OpenPut
    assert first.result(10) == 4 and second.result(10) == 4
    layers = [page_bytes(20 + layer, 4, SEGMENT) for layer in range(LAYERS)]
    for layer in range(LAYERS):
        assert writer.put_layer(tokens, layer, layers[layer]) == 4
    assert writer.open_put(tokens).result(10) == 0  # stored: nothing left to write
    assert writer.put_layer(tokens, 0, layers[0]) == 0
    assert writer.open_put(prompt(3, PAGE - 1)).result(10) == 0  # no full page


def test_abort_and_close_give_back_a_session_opened_ahead(cluster, client, namespace):
    writer = client(cluster, namespace, create=GEOMETRY)
    other = client(cluster, namespace)
    tokens = prompt(4, 5 * PAGE)
    writer.open_put(tokens)
    assert writer.abort(tokens) == 5  # waited for the open on its way, then freed its pages
    # closed while a session opened ahead is on its way: it is aborted once it lands, not left pending
    later = prompt(5, 3 * PAGE)
    opened = writer.open_put(later)
    writer.close()
    assert opened.result(0) == 3
    layers = [page_bytes(50 + layer, 3, SEGMENT) for layer in range(LAYERS)]
    assert [other.put_layer(later, layer, layers[layer]) for layer in range(LAYERS)] == [3] * LAYERS


def test_bad_input_to_open_put(cluster, client, namespace):
    writer = client(cluster, namespace, create=GEOMETRY)
    with pytest.raises(KVStoreError) as bad_tokens:
        writer.open_put(np.array([1, -5, 3] * PAGE))
    assert bad_tokens.value.code is ErrorCode.BAD_TOKENS
    with pytest.raises(KVStoreError) as few_contexts:
        writer.open_put(prompt(6, 2 * PAGE), contexts=[b"a"])
    assert few_contexts.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(KVStoreError) as bad_rank:
        writer.open_put(prompt(6, 2 * PAGE), tp_rank=2, tp_size=2)
    assert bad_rank.value.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.BAD_RANGE)


def test_a_failed_open_ahead_reaches_its_future_and_the_put_raises_it(cluster, client, namespace):
    writer = client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(7, 2 * PAGE)
    client(cluster, namespace).delete_namespace()  # the master no longer knows it; the writer has its layout
    opened = writer.open_put(tokens)
    with pytest.raises(KVStoreError) as failed:
        opened.result(10)
    with pytest.raises(KVStoreError) as again:
        writer.put_layer(tokens, 0, page_bytes(70, 2, SEGMENT))
    assert failed.value.code is again.value.code


def test_async_client_opens_ahead(cluster, client, namespace):
    client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(8, 2 * PAGE)
    layers = [page_bytes(80 + layer, 2, SEGMENT) for layer in range(LAYERS)]

    async def main() -> list[int]:
        async with AsyncKVStoreClient(cluster.master_address, namespace) as c:
            opened = c.open_put(tokens)
            written = [await c.put_layer(tokens, layer, layers[layer]) for layer in range(LAYERS)]
            assert await opened == 2
            return written

    assert asyncio.run(main()) == [2] * LAYERS
