"""Eviction under pressure (invariants 2 and 3): a small node written far beyond its capacity.

Puts keep succeeding or answer NO_ROOM; every matched prefix reads back the
bytes that were written for it (no page without its parent or a layer); the
pages under a read lease survive all of it.
"""

from __future__ import annotations

import numpy as np

from kvstore.testing import page_bytes, prompt, put_or_no_room, wait_for

PAGE = 16
LAYERS = 4
SEGMENT = 64 << 10  # 256 KiB slots: a 16 MiB node holds 64 pages


def _page_data(seed: int, pages: int) -> list[np.ndarray]:
    return [page_bytes(seed * 10 + layer, pages, SEGMENT) for layer in range(LAYERS)]


def test_eviction_under_pressure(make_cluster, client):
    cluster = make_cluster(dram="16MiB", read_lease_ms=60_000, quarantine_ms=200)
    c = client(cluster, "pressure/ns")
    c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)

    pinned_tokens = prompt(1000, 4 * PAGE)
    pinned = _page_data(1000, 4)
    assert put_or_no_room(c, pinned_tokens, pinned) == 4
    lease = c.acquire_prefix(pinned_tokens)
    assert lease.num_pages == 4

    # chains of base (4 pages) + extension (4 more) until twice the node's 64 slots went in.  Evicted
    # slots sit out a 200 ms quarantine, during which puts get NO_ROOM: keep writing until time brings room.
    chains: list[tuple[np.ndarray, list[np.ndarray]]] = []
    written = 0

    def write_next_chain() -> bool:
        nonlocal written
        i = len(chains)
        base = prompt(2000 + i, 4 * PAGE)
        extended = np.concatenate([base, prompt(3000 + i, 4 * PAGE)])
        data = _page_data(2000 + i, 8)
        written += put_or_no_room(c, base, [d[:4] for d in data])
        written += put_or_no_room(c, extended, data)
        chains.append((extended, data))
        return written >= 2 * 64

    wait_for(write_next_chain, 30.0, "128 pages to be written into a 64-slot node")

    stats = cluster.stats()
    assert sum(t.evictions for n in stats.nodes for t in n.tiers) > 0
    for n in stats.nodes:
        for t in n.tiers:
            assert t.allocated_bytes <= t.capacity_bytes

    found = 0
    for extended, data in chains:
        matched = c.match_prefix(extended)
        hit = c.get_prefix(extended)
        assert matched % PAGE == 0
        assert hit.num_pages <= matched // PAGE  # nothing appears between match and get here
        for layer in range(LAYERS):
            np.testing.assert_array_equal(hit.layer(layer), data[layer][: hit.num_pages])
        found += hit.num_pages
    assert found > 0, "the most recent chains should still be stored"

    # the leased pages were never evicted
    hit = c.get_prefix(pinned_tokens, lease=lease)
    assert hit.num_pages == 4
    for layer in range(LAYERS):
        np.testing.assert_array_equal(hit.layer(layer), pinned[layer])
    assert c.match_prefix(pinned_tokens) == 4 * PAGE
    c.release(lease)
