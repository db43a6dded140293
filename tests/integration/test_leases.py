"""Read leases end to end (invariant 2): usable from another process, released, expiring, and
a stale lease after its slot was reused reads a miss, never another key's bytes (invariant 1).

The shared cluster has 2 s read/write leases and a 500 ms quarantine.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvstore import keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.testing import get_layers, page_bytes, prompt, wait_for

PAGE = 16
LAYERS = 2
SEGMENT = 16384
GEOMETRY = (PAGE, LAYERS, SEGMENT)  # client(..., create=GEOMETRY): page_size, num_layers, segment_bytes


def _fill(c, seed: int, pages: int) -> tuple[np.ndarray, list[np.ndarray]]:
    tokens = prompt(seed, pages * PAGE)
    layers = [page_bytes(seed * 10 + layer, pages, SEGMENT) for layer in range(LAYERS)]
    for layer in range(LAYERS):
        assert c.put_layer(tokens, layer, layers[layer]) == pages
    return tokens, layers


def _slots(response: pb.AcquirePrefixResponse) -> list[int]:
    return np.frombuffer(response.placements.slot_offsets, dtype="<u8")[: response.num_pages].tolist()


def test_lease_is_usable_from_another_process(cluster, client, workers, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    tokens, layers = _fill(c, 30, 5)
    lease = c.acquire_prefix(tokens)
    assert lease.num_pages == 5 and lease.num_tokens == 5 * PAGE
    try:
        for transport in ("shm", "tcp"):
            pages, got = workers.run(
                "reader",
                get_layers,
                cluster.master_address,
                namespace,
                tokens,
                transport,
                lease=lease.lease_id,
            )
            assert pages == 5
            np.testing.assert_array_equal(got[1], layers[1])
        # the lease is the reader's to use, not to end: it is still there for its owner
        assert cluster.evict(namespace).pages_skipped_leased == 5
    finally:
        assert c.release(lease) is True


def test_lease_object_crosses_processes(cluster, client, workers, namespace):
    """A Lease handed to a worker pool as is (pickled with its placements) reads there too."""
    c = client(cluster, namespace, create=GEOMETRY)
    tokens, layers = _fill(c, 34, 2)
    lease = c.acquire_prefix(tokens)
    try:
        pages, got = workers.run("reader", get_layers, cluster.master_address, namespace, tokens, lease=lease)
        assert pages == 2
        np.testing.assert_array_equal(got[0], layers[0])
    finally:
        c.release(lease)


def test_release_ends_the_lease(cluster, client, workers, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    tokens, _ = _fill(c, 31, 3)
    lease = c.acquire_prefix(tokens)
    assert cluster.evict(namespace).pages_skipped_leased == 3  # pinned while leased
    assert c.release(lease) is True
    assert c.release(lease) is False  # already gone
    with pytest.raises(KVStoreError) as err:
        workers.run("reader", get_layers, cluster.master_address, namespace, tokens, lease=lease.lease_id)
    assert err.value.code is ErrorCode.LEASE_NOT_FOUND
    evicted = cluster.evict(namespace)
    assert evicted.pages_evicted == 3 and evicted.pages_skipped_leased == 0


def test_forgotten_lease_expires_and_pages_become_evictable(cluster, client, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    tokens, layers = _fill(c, 32, 4)
    lease = c.acquire_prefix(tokens)  # never released
    taken = time.monotonic()
    first = cluster.evict(namespace)
    assert first.pages_evicted == 0 and first.pages_skipped_leased == 4
    hit = c.get_prefix(tokens, lease=lease)
    assert hit.num_pages == 4
    np.testing.assert_array_equal(hit.layer(0), layers[0])

    evicted = []

    def gone() -> bool:
        evicted.append(cluster.evict(namespace).pages_evicted)
        return sum(evicted) == 4

    wait_for(gone, 10.0, "the forgotten lease to expire and its pages to be evicted")
    assert time.monotonic() - taken >= 1.5  # not before the 2 s read lease ran out
    assert c.match_prefix(tokens) == 0


def test_requested_lease_is_capped(cluster, client, namespace):
    c = client(cluster, namespace, create=GEOMETRY)
    tokens, _ = _fill(c, 33, 1)
    lease = c.acquire_prefix(tokens, lease_ms=10**9)  # "forever" is not on offer
    assert lease.expires_unix_ms - time.time() * 1000 <= 300_000 + 5_000
    c.release(lease)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_stale_lease_after_slot_reuse_reads_a_miss(make_cluster, client, transport):
    # 16 MiB node, 1 MiB slots: refilling it after an eviction must reuse the old slots.
    cluster = make_cluster(dram="16MiB")
    namespace = "stale/lease"
    slot_segment = 256 << 10
    c = client(cluster, namespace, transport=transport)
    c.create_namespace(page_size=PAGE, num_layers=4, segment_bytes=slot_segment)
    old_tokens = prompt(40, 2 * PAGE)
    old = [page_bytes(400 + layer, 2, slot_segment) for layer in range(4)]
    for layer in range(4):
        assert c.put_layer(old_tokens, layer, old[layer]) == 2
    lease = c.acquire_prefix(old_tokens)
    assert lease.num_pages == 2
    old_slots = set(
        _slots(
            cluster.call(cluster.kvstore_stub.DescribeLease, pb.DescribeLeaseRequest(lease_id=lease.lease_id))
        )
    )
    assert len(old_slots) == 2

    # let the lease lapse, evict the pages, wait out the quarantine
    wait_for(
        lambda: cluster.evict(namespace).pages_evicted == 2 or c.match_prefix(old_tokens) == 0,
        10.0,
        "the lease to lapse and the old pages to be evicted",
    )
    wait_for(
        lambda: all(t.quarantined_bytes == 0 for n in cluster.stats().nodes for t in n.tiers),
        10.0,
        "the freed slots to leave quarantine",
    )

    # fill every slot with other data
    foreign = [page_bytes(500 + layer, 1, slot_segment) for layer in range(4)]
    written = 0
    reused: set[int] = set()
    root = keys.namespace_root(namespace)
    for seed in range(41, 41 + 24):
        tokens = prompt(seed, PAGE)
        try:
            got = [c.put_layer(tokens, layer, foreign[layer]) for layer in range(4)]
        except KVStoreError as exc:
            assert exc.status.name == "RESOURCE_EXHAUSTED"
            continue
        written += got[0]
        request = pb.AcquirePrefixRequest(
            namespace=namespace, keys=keys.pack_keys(keys.page_keys(root, tokens, PAGE))
        )
        taken = cluster.call(cluster.kvstore_stub.AcquirePrefix, request)
        reused |= old_slots & set(_slots(taken))
        cluster.call(cluster.kvstore_stub.ReleaseLease, pb.ReleaseLeaseRequest(lease_id=taken.lease_id))
    assert written >= 8, f"only {written} pages written into a 16-slot node"
    assert reused, "the old pages' slots were not reused: the test proves nothing"

    # the stale lease (with its cached placements) must not hand back the foreign bytes
    try:
        hit = c.get_prefix(old_tokens, lease=lease)
    except KVStoreError as exc:
        assert exc.code in (ErrorCode.LEASE_NOT_FOUND, ErrorCode.BAD_GRANT, ErrorCode.STALE_INCARNATION)
        return
    for layer in range(4):
        data = hit.layer(layer)
        for page in range(hit.num_pages):
            assert not np.array_equal(data[page], foreign[layer][0]), "stale lease read another key's bytes"
            np.testing.assert_array_equal(data[page], old[layer][page])
    assert hit.num_pages == 0
