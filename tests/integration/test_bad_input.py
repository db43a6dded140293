"""Every bad input gets a gRPC status with a clear message and the service keeps serving (invariant 5).

Each test checks the KVStoreError code (and with it the gRPC status), then
that the cluster still takes a normal put and get (kvstore.testing.check_serves).
"""

from __future__ import annotations

import signal
import socket
import time

import grpc
import numpy as np
import pytest
import xxhash

from kvstore import grants, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.testing import (
    FAST_SETTINGS,
    Cluster,
    check_serves,
    hold_put_session,
    page_bytes,
    prompt,
    spawn_context,
    wait_for,
)
from kvstore.transports import tcp_wire

PAGE = 4
LAYERS = 2
SEGMENT = 4096
MAX_PAGES = 64


@pytest.fixture(scope="module")
def _limited_cluster():
    with Cluster(1, dram="64MiB", max_request_pages=MAX_PAGES, **FAST_SETTINGS) as cluster:
        yield cluster


@pytest.fixture
def limited(attach, _limited_cluster):
    """The module's cluster: one node, at most 64 pages per request."""
    return attach(_limited_cluster)


@pytest.fixture
def ns_client(limited, client, namespace):
    c = client(limited, namespace)
    c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
    return c


def _raises(code: ErrorCode, fn, *args, **kwargs) -> KVStoreError:
    with pytest.raises(KVStoreError) as err:
        fn(*args, **kwargs)
    assert err.value.code is code, f"expected {code.name}, got {err.value}"
    assert err.value.status == code.status
    assert err.value.message, "errors carry a message"
    return err.value


def test_wrong_kv_size(limited, ns_client):
    tokens = prompt(1, 3 * PAGE)
    _raises(ErrorCode.BAD_SIZE, ns_client.put_layer, tokens, 0, np.zeros((3, SEGMENT - 1), np.uint8))
    _raises(ErrorCode.BAD_SIZE, ns_client.put_layer, tokens, 0, np.zeros((2, SEGMENT), np.uint8))
    _raises(
        ErrorCode.BAD_SIZE, ns_client.get_prefix, tokens, out=np.zeros((LAYERS, 3, SEGMENT + 8), np.uint8)
    )
    check_serves(limited)


def test_unknown_namespace(limited, client):
    c = client(limited, "no/such-namespace")
    err = _raises(ErrorCode.NAMESPACE_NOT_FOUND, c.match_prefix, prompt(2, 8))
    assert err.status == grpc.StatusCode.NOT_FOUND
    _raises(ErrorCode.NAMESPACE_NOT_FOUND, c.put_layer, prompt(2, 8), 0, np.zeros(1, np.uint8))
    check_serves(limited)


def test_layer_out_of_range(limited, ns_client):
    tokens = prompt(3, 2 * PAGE)
    _raises(ErrorCode.BAD_RANGE, ns_client.put_layer, tokens, LAYERS, np.zeros((2, SEGMENT), np.uint8))
    _raises(ErrorCode.BAD_RANGE, ns_client.put_layer, tokens, -1, np.zeros((2, SEGMENT), np.uint8))
    _raises(ErrorCode.BAD_RANGE, ns_client.get_prefix, tokens, layers=[0, LAYERS])
    check_serves(limited)


def test_opaque_segments_cannot_be_split_by_head(limited, ns_client):
    _raises(ErrorCode.BAD_RANGE, ns_client.get_prefix, prompt(4, 2 * PAGE), heads=(0, 2))


@pytest.mark.parametrize(
    "tokens",
    [[], [-1, 2, 3, 4], [1, 2, 3, 2**31], [[1, 2], [3, 4]], [1.5, 2.0, 3.0, 4.0]],
    ids=["empty", "negative", "too-large", "2d", "float"],
)
def test_bad_tokens(limited, ns_client, tokens):
    arr = np.array(tokens)
    _raises(ErrorCode.BAD_TOKENS, ns_client.match_prefix, arr)
    _raises(ErrorCode.BAD_TOKENS, ns_client.get_prefix, arr)
    _raises(ErrorCode.BAD_TOKENS, ns_client.put_layer, arr, 0, np.zeros((1, SEGMENT), np.uint8))


def test_request_over_max_request_pages(limited, ns_client):
    tokens = prompt(5, (MAX_PAGES + 1) * PAGE)
    err = _raises(
        ErrorCode.TOO_LARGE, ns_client.put_layer, tokens, 0, np.zeros((MAX_PAGES + 1, SEGMENT), np.uint8)
    )
    assert err.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    _raises(ErrorCode.TOO_LARGE, ns_client.match_prefix, tokens)
    _raises(ErrorCode.TOO_LARGE, ns_client.acquire_prefix, tokens)
    # exactly the limit is fine
    assert ns_client.match_prefix(tokens[: MAX_PAGES * PAGE]) == 0
    check_serves(limited)


def _raw(cluster: Cluster, method: str, request) -> object:
    return cluster.call(getattr(cluster.kvstore_stub, method), request)


@pytest.mark.parametrize(
    "method,request_type",
    [
        ("MatchPrefix", pb.MatchPrefixRequest),
        ("AcquirePrefix", pb.AcquirePrefixRequest),
        ("OpenPut", pb.OpenPutRequest),
    ],
)
def test_malformed_keys_from_a_raw_stub(limited, ns_client, namespace, method, request_type):
    for bad in (b"\x00" * 17, b"\x01" * 15):
        with pytest.raises(KVStoreError) as err:
            _raw(limited, method, request_type(namespace=namespace, keys=bad))
        assert err.value.status == grpc.StatusCode.INVALID_ARGUMENT, err.value
    check_serves(limited)


def test_raw_stub_bad_fields(limited, ns_client, namespace):
    good_keys = keys.pack_keys(keys.page_keys(keys.namespace_root(namespace), prompt(6, 2 * PAGE), PAGE))
    cases = [
        ("OpenPut", pb.OpenPutRequest(namespace=namespace, keys=good_keys, tp_rank=1, tp_size=1)),
        ("OpenPut", pb.OpenPutRequest(namespace=namespace, keys=good_keys, parent_key=b"short")),
        (
            "CommitLayer",
            pb.CommitLayerRequest(session_id=123456789, layers=b"\x00\x00", checksums=b"\x00" * 8),
        ),
        ("DescribeLease", pb.DescribeLeaseRequest(lease_id="")),
        ("GetExtra", pb.GetExtraRequest(namespace=namespace, sequence_digest=b"x", name="a")),
        ("CreateNamespace", pb.CreateNamespaceRequest(spec=pb.NamespaceSpec(name="", page_size=0))),
    ]
    for method, request in cases:
        with pytest.raises(KVStoreError) as err:
            _raw(limited, method, request)
        assert err.value.status in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION,
        ), (method, err.value)
        assert err.value.code is not ErrorCode.INTERNAL, (method, err.value)
    assert not _raw(limited, "ReleaseLease", pb.ReleaseLeaseRequest(lease_id="no-such-lease")).released
    check_serves(limited)


# ---------------------------------------------------------------- grants on the data port


def _open_raw_put(cluster: Cluster, namespace: str, seed: int) -> pb.OpenPutResponse:
    page_keys = keys.page_keys(keys.namespace_root(namespace), prompt(seed, 2 * PAGE), PAGE)
    response = _raw(
        cluster,
        "OpenPut",
        pb.OpenPutRequest(namespace=namespace, keys=keys.pack_keys(page_keys), tp_rank=0, tp_size=1),
    )
    assert list(response.status) == [pb.PAGE_NEW, pb.PAGE_NEW]
    return response


def _write_request(address: str, grant: pb.Grant, slot: int, payload: bytes) -> None:
    """One raw WRITE on the data port; raises the node's KVStoreError."""
    host, _, port = address.rpartition(":")
    ops = np.array([[slot, 0, len(payload)]], dtype=np.uint64)
    head = tcp_wire.encode_request_head(tcp_wire.OP_WRITE, grant.SerializeToString(), ops, len(payload))
    hashes = np.array([xxhash.xxh3_64_intdigest(payload)], dtype="<u8").tobytes()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + payload + hashes)  # the hashes follow the payload
        tcp_wire.read_response_head(sock)


def _read_request(address: str, grant: pb.Grant, slot: int, length: int) -> None:
    host, _, port = address.rpartition(":")
    ops = np.array([[slot, 0, length]], dtype=np.uint64)
    head = tcp_wire.encode_request_head(tcp_wire.OP_READ, grant.SerializeToString(), ops, 0)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        tcp_wire.read_response_head(sock)


def test_forged_and_expired_grants_are_refused_by_the_node(limited, ns_client, namespace):
    response = _open_raw_put(limited, namespace, 7)
    placements = response.placements
    node = placements.nodes[0]
    real = placements.grants[0]
    slot = int(np.frombuffer(placements.slot_offsets, dtype="<u8")[0])
    payload = bytes(range(256)) * 4
    try:
        # the genuine grant works (so the refusals below are about the grant, nothing else)
        _write_request(node.data_address, real, slot, payload)

        forged = pb.Grant()
        forged.CopyFrom(real)
        forged.mac = bytes(b ^ 0xFF for b in real.mac)
        err = _raises(ErrorCode.BAD_GRANT, _write_request, node.data_address, forged, slot, payload)
        assert err.status == grpc.StatusCode.UNAUTHENTICATED

        widened = pb.Grant()
        widened.CopyFrom(real)
        widened.rights = grants.READ | grants.WRITE
        _raises(ErrorCode.BAD_GRANT, _write_request, node.data_address, widened, slot, payload)

        secret = bytes.fromhex(limited.grant_secret)
        expired = _expired_copy(secret, real, grants.WRITE)
        err = _raises(ErrorCode.BAD_GRANT, _write_request, node.data_address, expired, slot, payload)
        assert "expired" in err.message
        err = _raises(
            ErrorCode.BAD_GRANT,
            _read_request,
            node.data_address,
            _expired_copy(secret, real, grants.READ),
            slot,
            64,
        )
        assert "expired" in err.message

        # a grant for another incarnation of the node
        stale = grants.sign(
            secret,
            real.node_id,
            b"\x00" * 16,
            np.frombuffer(real.slots, dtype="<u8"),
            np.frombuffer(real.generations, dtype="<u4"),
            int(time.time() * 1000) + 60_000,
            real.term,
            grants.WRITE,
        )
        _raises(ErrorCode.BAD_GRANT, _write_request, node.data_address, stale, slot, payload)
    finally:
        _raw(limited, "AbortPut", pb.AbortPutRequest(session_id=response.session_id))
    stats = limited.call(limited.admin.ClusterStats, pb.ClusterStatsRequest())
    assert stats.nodes[0].alive
    check_serves(limited, transport="tcp")
    check_serves(limited, transport="shm")


def test_checksum_mismatch_is_refused(limited, ns_client, namespace):
    response = _open_raw_put(limited, namespace, 8)
    placements = response.placements
    slot = int(np.frombuffer(placements.slot_offsets, dtype="<u8")[0])
    address = placements.nodes[0].data_address
    host, _, port = address.rpartition(":")
    payload = b"\x07" * 512
    ops = np.array([[slot, 0, len(payload)]], dtype=np.uint64)
    head = tcp_wire.encode_request_head(
        tcp_wire.OP_WRITE, placements.grants[0].SerializeToString(), ops, len(payload)
    )
    wrong_hash = np.array([xxhash.xxh3_64_intdigest(payload) ^ 1], dtype="<u8").tobytes()
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + payload + wrong_hash)
            err = _raises(ErrorCode.INVALID_ARGUMENT, tcp_wire.read_response_head, sock)
        assert "checksum" in err.message
    finally:
        _raw(limited, "AbortPut", pb.AbortPutRequest(session_id=response.session_id))
    check_serves(limited)


# ---------------------------------------------------------------- a client killed mid-put


def test_client_killed_mid_session_is_reclaimed(make_cluster, client):
    cluster = make_cluster()
    namespace = "killed/client"
    c = client(cluster, namespace)
    c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
    tokens = prompt(9, 6 * PAGE)
    layers = [page_bytes(90 + layer, 6, SEGMENT) for layer in range(LAYERS)]

    ctx = spawn_context()
    ready = ctx.Queue()
    victim = ctx.Process(
        target=hold_put_session,
        args=(cluster.master_address, namespace, tokens, layers[:1], [0], ready),
        daemon=True,
    )
    victim.start()
    try:
        assert ready.get(timeout=60) == [6]  # layer 0 of 6 pages written, layer 1 never comes
        assert cluster.stats().open_put_sessions == 1
        victim.kill()
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL
    finally:
        if victim.is_alive():
            victim.kill()
            victim.join()

    assert c.match_prefix(tokens) == 0  # half-written pages are never matched
    # while the dead writer's lease runs, its pages are claimed: another writer gets nothing to write
    probe = client(cluster, namespace)
    assert [probe.put_layer(tokens, layer, layers[layer]) for layer in range(LAYERS)] == [0, 0]
    check_serves(cluster)  # everyone else is served meanwhile

    def reclaimed() -> bool:
        stats = cluster.stats()
        usage = [ns.pages for ns in stats.namespaces if ns.name == namespace]
        return stats.open_put_sessions == 0 and not any(usage)

    wait_for(reclaimed, 10.0, "the dead writer's put session (2 s write lease) to be reclaimed")
    # its slots come back after the quarantine; the pages are free to be written again
    written = wait_for(
        lambda: [c.put_layer(tokens, layer, layers[layer]) for layer in range(LAYERS)] == [6, 6],
        10.0,
        "the reclaimed pages to be writable again",
    )
    assert written
    hit = c.get_prefix(tokens)
    assert hit.num_pages == 6
    np.testing.assert_array_equal(hit.layer(1), layers[1])


def _expired_copy(secret: bytes, real: pb.Grant, rights: int) -> pb.Grant:
    """``real``'s slots, validly signed, but expired a second ago."""
    return grants.sign(
        secret,
        real.node_id,
        real.incarnation,
        np.frombuffer(real.slots, dtype="<u8"),
        np.frombuffer(real.generations, dtype="<u4"),
        int(time.time() * 1000) - 1000,
        real.term,
        rights,
    )
