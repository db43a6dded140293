"""Put in one process, get in another: bytes, prefixes, completeness, first writer wins, extras.

Invariants 1 (a reader gets only committed bytes under that key) and 3 (a
match never includes a page with a missing parent or layer), end to end with
real master, node and client processes.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.keys import TokenSequence
from kvstore.testing import get_layers, page_bytes, prompt, put_layers

PAGE = 16
LAYERS = 4
SEGMENT = 8192
GEOMETRY = (PAGE, LAYERS, SEGMENT)  # client(..., create=GEOMETRY): page_size, num_layers, segment_bytes


def _layers(seed: int, pages: int) -> list[np.ndarray]:
    return [page_bytes(seed * 100 + layer, pages, SEGMENT) for layer in range(LAYERS)]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_put_in_one_process_get_in_another(cluster, client, workers, namespace, transport):
    client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(1, 8 * PAGE)
    layers = _layers(1, 8)
    written = workers.run("writer", put_layers, cluster.master_address, namespace, tokens, layers, transport)
    assert written == [8] * LAYERS
    pages, got = workers.run("reader", get_layers, cluster.master_address, namespace, tokens, transport)
    assert pages == 8
    for layer in range(LAYERS):
        np.testing.assert_array_equal(got[layer], layers[layer])


@pytest.mark.parametrize("writer_transport,reader_transport", [("shm", "tcp"), ("tcp", "shm")])
def test_transports_see_the_same_bytes(
    cluster, client, workers, namespace, writer_transport, reader_transport
):
    client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(2, 3 * PAGE)
    layers = _layers(2, 3)
    workers.run("writer", put_layers, cluster.master_address, namespace, tokens, layers, writer_transport)
    pages, got = workers.run(
        "reader", get_layers, cluster.master_address, namespace, tokens, reader_transport, layers=[3, 1]
    )
    assert pages == 3
    np.testing.assert_array_equal(got[0], layers[3])
    np.testing.assert_array_equal(got[1], layers[1])


def test_partial_prefix(cluster, client, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(3, 8 * PAGE)
    layers = _layers(3, 4)
    for layer in range(LAYERS):
        assert c.put_layer(tokens[: 4 * PAGE], layer, layers[layer]) == 4
    # asking for a longer sequence finds the 4 stored pages
    assert c.match_prefix(tokens) == 4 * PAGE
    hit = c.get_prefix(tokens)
    assert hit.num_pages == 4 and hit.num_tokens == 4 * PAGE
    for layer in range(LAYERS):
        np.testing.assert_array_equal(hit.layer(layer), layers[layer])
    # asking for a shorter one finds just its pages
    short = c.get_prefix(tokens[: 2 * PAGE + 5])
    assert short.num_pages == 2
    np.testing.assert_array_equal(short.layer(0), layers[0][:2])


def test_a_token_sequence_and_plain_tokens_are_the_same_put_and_prefix(cluster, client, namespace):
    """One put session whether a layer names its tokens as a TokenSequence or a plain array."""
    c = client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(6, 5 * PAGE + 3)
    seq = TokenSequence(tokens)
    layers = _layers(6, 5)
    assert c.put_layer(tokens, 0, layers[0]) == 5
    assert c.put_layer(seq, 1, layers[1]) == 5  # the same session: no second OpenPut
    futures = [c.put_layer_async(seq, layer, layers[layer]) for layer in (2, 3)]
    assert [f.result(30) for f in futures] == [5, 5]
    c.flush()
    assert c.match_prefix(seq) == 5 * PAGE
    hit = c.get_prefix(seq)
    assert hit.num_pages == 5
    for layer in range(LAYERS):
        np.testing.assert_array_equal(hit.layer(layer), layers[layer])
    assert c.get_prefix(tokens).num_pages == 5


def test_divergent_suffix_shares_only_common_pages(cluster, client, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    first = prompt(4, 8 * PAGE)
    second = first.copy()
    second[3 * PAGE + 2 :] = prompt(5, 8 * PAGE)[3 * PAGE + 2 :]  # diverges inside page 3
    first_layers, second_layers = _layers(4, 8), _layers(5, 8)
    for layer in range(LAYERS):
        assert c.put_layer(first, layer, first_layers[layer]) == 8
    assert c.match_prefix(second) == 3 * PAGE
    for layer in range(LAYERS):
        assert c.put_layer(second, layer, second_layers[layer]) == 5  # pages 0-2 are already stored
    hit = c.get_prefix(second)
    assert hit.num_pages == 8
    for layer in range(LAYERS):
        np.testing.assert_array_equal(hit.layer(layer)[:3], first_layers[layer][:3])
        np.testing.assert_array_equal(hit.layer(layer)[3:], second_layers[layer][3:])
    again = c.get_prefix(first)
    assert again.num_pages == 8
    np.testing.assert_array_equal(again.layer(2), first_layers[2])


def test_page_missing_a_layer_is_not_matched(cluster, client, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    base = prompt(6, 4 * PAGE)
    extended = np.concatenate([base, prompt(7, 4 * PAGE)])
    base_layers, ext_layers = _layers(6, 4), _layers(7, 8)
    for layer in range(LAYERS):
        c.put_layer(base, layer, base_layers[layer])
    for layer in (0, 1, 3):  # layer 2 of the extension never arrives
        assert c.put_layer(extended, layer, ext_layers[layer]) == 4
    assert c.match_prefix(extended) == 4 * PAGE
    hit = c.get_prefix(extended)
    assert hit.num_pages == 4
    np.testing.assert_array_equal(hit.layer(2), base_layers[2])
    lonely = prompt(8, 2 * PAGE)
    assert c.put_layer(lonely, 0, _layers(8, 2)[0]) == 2
    assert c.match_prefix(lonely) == 0
    assert c.get_prefix(lonely).num_pages == 0


def test_non_full_last_page_is_not_stored(cluster, client, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(9, 5 * PAGE + 7)
    layers = _layers(9, 5)
    for layer in range(LAYERS):
        assert c.put_layer(tokens, layer, layers[layer]) == 5
    assert c.match_prefix(tokens) == 5 * PAGE
    assert c.get_prefix(tokens).num_tokens == 5 * PAGE
    # fewer tokens than a page: nothing to store, nothing to match
    assert c.put_layer(tokens[: PAGE - 1], 0, np.empty((0, SEGMENT), np.uint8)) == 0
    assert c.match_prefix(tokens[: PAGE - 1]) == 0


def test_first_writer_wins(cluster, client, workers, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(10, 4 * PAGE)
    mine, theirs = _layers(10, 4), _layers(11, 4)
    assert workers.run("writer", put_layers, cluster.master_address, namespace, tokens, mine) == [4] * LAYERS
    # a second writer of the same tokens writes nothing, whatever bytes it brings
    assert (
        workers.run("writer2", put_layers, cluster.master_address, namespace, tokens, theirs) == [0] * LAYERS
    )
    # and so does the first writer putting it again (already stored)
    assert [c.put_layer(tokens, layer, mine[layer]) for layer in range(LAYERS)] == [0] * LAYERS
    pages, got = workers.run("reader", get_layers, cluster.master_address, namespace, tokens)
    assert pages == 4
    for layer in range(LAYERS):
        np.testing.assert_array_equal(got[layer], mine[layer])


def test_extras_round_trip(cluster, client, workers, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    tokens = prompt(12, 3 * PAGE + 5)
    c.put_extra(tokens, "first_token", np.array([31337], dtype=np.int64))
    c.put_extra(tokens, "hidden", b"\x01\x02\x03" * 1000)
    other = client(cluster, namespace, transport="tcp")
    assert np.frombuffer(other.get_extra(tokens, "first_token"), dtype=np.int64)[0] == 31337
    assert other.get_extra(tokens, "hidden") == b"\x01\x02\x03" * 1000
    # the key is the whole sequence, tail included
    assert other.get_extra(tokens[:-1], "first_token") is None
    assert other.get_extra(tokens, "no-such-extra") is None
