"""The client's put and get flows against an in-process stand-in cluster.

The stand-ins are deliberately small: a gRPC KVStore servicer that keeps the
index in dicts and allocates slots round-robin over two nodes, and a TCP data
server that speaks tcp_wire over real DramPool files.  They follow the
protocol facts of the brief (statuses, grants, generations, checksum order) so
that the client's side of them can be checked here; the real master and node
are exercised together in tests/integration.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import pickle
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import xxhash

from kvstore import AsyncKVStoreClient, ErrorCode, KVStoreClient, KVStoreError, grants, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ERROR_METADATA_KEY
from kvstore.layout import Layout
from kvstore.testing import wait_for
from kvstore.tiers.dram import DramPool
from kvstore.transports import tcp_wire

SECRET = b"k" * 32
NAMESPACE = "t/flows"
PAGE, LAYERS, KV_HEADS, HEAD_DIM = 4, 3, 4, 8


# ---------------------------------------------------------------- stand-in node


class FakeNode:
    """A DRAM pool plus a tcp_wire data server over it."""

    def __init__(self, directory: str, node_id: str) -> None:
        self.node_id = node_id
        self.pool = DramPool.create(directory, node_id, 256 * 4096, prefault=False)
        self.next_slot = 0
        self.corrupt_reads = False
        self.trailer_zero = False
        self.requests: collections.Counter[str] = collections.Counter()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def ref(self) -> pb.NodeRef:
        return pb.NodeRef(
            node_id=self.node_id,
            incarnation=self.pool.header.incarnation,
            data_address=self.address,
            pool_path=self.pool.path,
            pool_data_offset=self.pool.header.data_offset,
            pool_bytes=len(self.pool.bytes),
        )

    def bump(self, slot: int) -> int:
        offsets = np.array([slot], dtype=np.uint64)
        generation = int(self.pool.generation(offsets)[0]) + 1
        self.pool.set_generation(offsets, np.array([generation], dtype=np.uint32))
        return generation

    def stop(self) -> None:
        # shutdown, not just close: a thread blocked in accept/recv keeps a closed socket alive
        self._running = False
        for sock in [self._listener, *self._conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.stop()
        self.pool.close()

    def _accept(self) -> None:
        while self._running:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    raw = tcp_wire.recv_exact(conn, tcp_wire.REQUEST_HEADER.size)
                except (ConnectionError, OSError):
                    return
                op, grant_len, nops, payload_len = tcp_wire.decode_request_header(raw)
                grant = pb.Grant.FromString(tcp_wire.recv_exact(conn, grant_len))
                ops = np.frombuffer(tcp_wire.recv_exact(conn, nops * 24), dtype="<u8").reshape(-1, 3)
                payload = tcp_wire.recv_exact(conn, payload_len) if op == 1 else b""
                hashes = np.frombuffer(tcp_wire.recv_exact(conn, nops * 8), dtype="<u8") if op == 1 else None
                self.requests["write" if op == 1 else "read"] += 1
                try:
                    conn.sendall(self._handle(op, grant, ops, hashes, payload))
                except KVStoreError as exc:
                    conn.sendall(tcp_wire.encode_response_head(1, tcp_wire.error_message(exc)))
                except OSError:
                    return

    def _handle(
        self, op: int, grant: pb.Grant, ops: np.ndarray, hashes: np.ndarray | None, payload: bytes
    ) -> bytes:
        need = grants.WRITE if op == 1 else grants.READ
        verified = grants.verify(SECRET, grant, self.node_id, self.pool.header.incarnation, need)
        expected = verified.generation_of(ops[:, 0])
        if not np.array_equal(self.pool.generation(ops[:, 0]), expected):
            raise KVStoreError(ErrorCode.BAD_GRANT, "slot generation moved")
        base = self.pool.header.data_offset
        starts = [base + int(s) + int(o) for s, o, _ in ops]
        lengths = [int(n) for n in ops[:, 2]]
        if op == 1:
            pos = 0
            for start, n in zip(starts, lengths, strict=True):
                self.pool.bytes[start : start + n] = np.frombuffer(payload, np.uint8, n, pos)
                pos += n
            landed = [
                xxhash.xxh3_64_intdigest(self.pool.bytes[s : s + n].tobytes())
                for s, n in zip(starts, lengths, strict=True)
            ]
            assert hashes is not None
            if landed != hashes.tolist():
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "checksum mismatch")
            return tcp_wire.encode_response_head(0)
        chunks = [self.pool.bytes[s : s + n].tobytes() for s, n in zip(starts, lengths, strict=True)]
        sums = np.array([xxhash.xxh3_64_intdigest(c) for c in chunks], dtype="<u8")
        data = bytearray(b"".join(chunks))
        if self.corrupt_reads and data:
            data[0] ^= 0xFF
        trailer = b"\x00" if self.trailer_zero else b"\x01"
        return (
            tcp_wire.encode_response_head(0, payload_len=len(data)) + bytes(data) + sums.tobytes() + trailer
        )


# ---------------------------------------------------------------- stand-in master


@dataclass
class FakePage:
    node: int
    slot: int
    generation: int
    coverage: np.ndarray  # bool [layers, heads]
    claims: set[tuple[int, int]] = field(default_factory=set)
    checksums: dict[tuple[int, int, int], int] = field(
        default_factory=dict
    )  # (layer, head begin, end) -> sum

    @property
    def complete(self) -> bool:
        return bool(self.coverage.all())


@dataclass
class FakeSession:
    keys: list[bytes]
    heads: tuple[int, int]
    layers: set[int] = field(default_factory=set)


def fail(context: grpc.ServicerContext, code: ErrorCode, message: str) -> None:
    context.set_trailing_metadata(((ERROR_METADATA_KEY, code.name),))
    context.abort(code.status, f"{code.name}: {message}")


class FakeMaster(pb_grpc.KVStoreServicer):
    def __init__(self, nodes: list[FakeNode]) -> None:
        self.nodes = nodes
        self.lock = threading.Lock()
        self.spec: pb.NamespaceSpec | None = None
        self.layout: Layout | None = None
        self.pages: dict[bytes, FakePage] = {}
        self.sessions: dict[int, FakeSession] = {}
        self.leases: dict[str, int] = {}
        self.lease_responses: dict[str, pb.AcquirePrefixResponse] = {}
        self.extras: dict[tuple[bytes, str], bytes] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.allocated = 0
        self.capacity_pages = 1 << 30
        self.failing_commits = 0  # the next this many CommitLayer calls fail with INTERNAL

    def _placements(self, page_list: list[FakePage | None], rights: int) -> pb.Placements:
        assert self.layout is not None
        per_node: dict[int, list[FakePage]] = collections.defaultdict(list)
        for page in page_list:
            if page is not None:
                per_node[page.node].append(page)
        expiry = int(time.time() * 1000) + 60_000
        node_grants = []
        for i, node in enumerate(self.nodes):
            mine = per_node.get(i, [])
            node_grants.append(
                grants.sign(
                    SECRET,
                    node.node_id,
                    node.pool.header.incarnation,
                    np.array([p.slot for p in mine], dtype=np.uint64),
                    np.array([p.generation for p in mine], dtype=np.uint32),
                    expiry,
                    1,
                    rights,
                )
            )
        return pb.Placements(
            nodes=[n.ref() for n in self.nodes],
            node_index=np.array([0xFFFF if p is None else p.node for p in page_list], dtype="<u2").tobytes(),
            slot_offsets=np.array([0 if p is None else p.slot for p in page_list], dtype="<u8").tobytes(),
            generations=np.array(
                [0 if p is None else p.generation for p in page_list], dtype="<u4"
            ).tobytes(),
            slot_bytes=self.layout.slot_bytes,
            grants=node_grants,
        )

    # -- namespaces
    def CreateNamespace(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["CreateNamespace"] += 1
        s = request.spec
        g = s.geometry
        layout = Layout.build(
            s.name, s.page_size, s.num_layers, s.segment_bytes, g.kind, g.kv_heads, g.head_dim, g.dtype
        )
        stored = pb.NamespaceSpec()
        stored.CopyFrom(s)
        stored.segment_bytes = layout.segment_bytes
        created = self.spec is None
        if not created and self.spec != stored:
            fail(context, ErrorCode.NAMESPACE_MISMATCH, "different layout")
        self.spec, self.layout = stored, layout
        return pb.CreateNamespaceResponse(spec=stored, created=created)

    def GetNamespace(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["GetNamespace"] += 1
        if self.spec is None or request.name != self.spec.name:
            fail(context, ErrorCode.NAMESPACE_NOT_FOUND, request.name)
        return pb.GetNamespaceResponse(spec=self.spec)

    def DeleteNamespace(self, request, context):  # type: ignore[no-untyped-def]
        freed = len(self.pages)
        self.pages.clear()
        self.spec = self.layout = None
        return pb.DeleteNamespaceResponse(pages_freed=freed)

    # -- put
    def OpenPut(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["OpenPut"] += 1
        assert self.layout is not None
        with self.lock:
            heads = self.layout.head_range(request.tp_rank, request.tp_size)
            status, placed, new_keys = [], [], []
            no_room = False
            for key in keys.unpack_keys(request.keys):
                page = self.pages.get(key)
                if page is None and not no_room:
                    if self.allocated >= self.capacity_pages:
                        no_room = True
                    else:
                        node_idx = self.allocated % len(self.nodes)
                        node = self.nodes[node_idx]
                        slot = node.next_slot * self.layout.slot_bytes
                        node.next_slot += 1
                        self.allocated += 1
                        page = self.pages[key] = FakePage(
                            node_idx,
                            slot,
                            node.bump(slot),
                            np.zeros((self.layout.num_layers, self.layout.kv_heads), dtype=bool),
                        )
                if no_room:
                    status.append(pb.PAGE_NO_ROOM)
                    placed.append(None)
                elif page.complete or heads in page.claims:
                    status.append(pb.PAGE_ALREADY_STORED)
                    placed.append(None)
                else:
                    page.claims.add(heads)
                    status.append(pb.PAGE_NEW)
                    placed.append(page)
                    new_keys.append(key)
            session_id = len(self.sessions) + 1
            self.sessions[session_id] = FakeSession(new_keys, heads)
            return pb.OpenPutResponse(
                session_id=session_id,
                status=bytes(status),
                placements=self._placements(placed, grants.WRITE),
                head_begin=heads[0],
                head_end=heads[1],
            )

    def CommitLayer(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["CommitLayer"] += 1
        if self.failing_commits:
            self.failing_commits -= 1
            fail(context, ErrorCode.INTERNAL, "commit refused by the test")
        assert self.layout is not None
        session = self.sessions.get(request.session_id)
        if session is None:
            fail(context, ErrorCode.SESSION_NOT_FOUND, str(request.session_id))
        layers = np.frombuffer(request.layers, dtype="<u2").tolist()
        sums = np.frombuffer(request.checksums, dtype="<u8").reshape(len(layers), len(session.keys))
        h0, h1 = session.heads
        completed = 0
        for li, layer in enumerate(layers):
            for j, key in enumerate(session.keys):
                page = self.pages[key]
                was = page.complete
                page.coverage[layer, h0:h1] = True
                page.checksums[(layer, h0, h1)] = int(sums[li, j])
                completed += int(page.complete and not was)
        session.layers.update(layers)
        return pb.CommitLayerResponse(
            pages_completed=completed, session_done=len(session.layers) == self.layout.num_layers
        )

    def AbortPut(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["AbortPut"] += 1
        session = self.sessions.pop(request.session_id, None)
        freed = 0
        for key in session.keys if session else []:
            page = self.pages.get(key)
            if page is not None and not page.complete:
                self.free(key)
                freed += 1
        return pb.AbortPutResponse(pages_freed=freed)

    def free(self, key: bytes) -> None:
        """The page goes and its slot's generation moves on (as when it is freed or reassigned)."""
        page = self.pages.pop(key)
        self.nodes[page.node].bump(page.slot)

    # -- get
    def _matched(self, packed: bytes) -> list[FakePage]:
        found = []
        for key in keys.unpack_keys(packed):
            page = self.pages.get(key)
            if page is None or not page.complete:
                break
            found.append(page)
        return found

    def MatchPrefix(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["MatchPrefix"] += 1
        return pb.MatchPrefixResponse(num_pages=len(self._matched(request.keys)))

    def AcquirePrefix(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["AcquirePrefix"] += 1
        found = self._matched(request.keys)
        lease_id = secrets.token_hex(16) if found else ""
        response = pb.AcquirePrefixResponse(
            lease_id=lease_id,
            num_pages=len(found),
            placements=self._placements(list(found), grants.READ),
            expires_unix_ms=int(time.time() * 1000) + 60_000,
            keys=request.keys[: len(found) * 16],
        )
        if lease_id:
            self.leases[lease_id] = len(found)
            self.lease_responses[lease_id] = response
        return response

    def DescribeLease(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["DescribeLease"] += 1
        if request.lease_id not in self.leases:
            fail(context, ErrorCode.LEASE_NOT_FOUND, request.lease_id)
        return self.lease_responses[request.lease_id]

    def ReleaseLease(self, request, context):  # type: ignore[no-untyped-def]
        self.calls["ReleaseLease"] += 1
        self.lease_responses.pop(request.lease_id, None)
        return pb.ReleaseLeaseResponse(released=self.leases.pop(request.lease_id, None) is not None)

    # -- extras
    def PutExtra(self, request, context):  # type: ignore[no-untyped-def]
        self.extras[(request.sequence_digest, request.name)] = request.data
        return pb.PutExtraResponse()

    def GetExtra(self, request, context):  # type: ignore[no-untyped-def]
        data = self.extras.get((request.sequence_digest, request.name))
        if data is None:
            fail(context, ErrorCode.EXTRA_NOT_FOUND, request.name)
        return pb.GetExtraResponse(data=data)


@dataclass
class Cluster:
    master: FakeMaster
    nodes: list[FakeNode]
    address: str

    def client(self, **options: object) -> KVStoreClient:
        return KVStoreClient(self.address, namespace=NAMESPACE, rpc_timeout_ms=5000, **options)  # type: ignore[arg-type]


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    nodes = [FakeNode(str(tmp_path), f"node-{i}") for i in range(2)]
    master = FakeMaster(nodes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_KVStoreServicer_to_server(master, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Cluster(master, nodes, f"127.0.0.1:{port}")
    server.stop(0)
    for node in nodes:
        node.close()


@pytest.fixture(params=["auto", "tcp"])
def mode(request) -> str:  # type: ignore[no-untyped-def]
    return str(request.param)


def create(client: KVStoreClient) -> Layout:
    return client.create_namespace(
        PAGE, LAYERS, kind="mha", kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="float16"
    )


def random_kv(layout: Layout, pages: int, heads: tuple[int, int] | None = None, seed: int = 0) -> np.ndarray:
    shard = layout.shard_bytes(heads or (0, layout.kv_heads))
    return np.random.default_rng(seed).integers(
        0, 256, size=(layout.num_layers, pages, shard), dtype=np.uint8
    )


def put_all(
    client: KVStoreClient, tokens: np.ndarray, kv: np.ndarray, tp_rank: int = 0, tp_size: int = 1
) -> list[int]:
    return [client.put_layer(tokens, layer, kv[layer], tp_rank, tp_size) for layer in range(len(kv))]


# ---------------------------------------------------------------- tests


def test_put_then_get_round_trip(cluster: Cluster, mode: str) -> None:
    with cluster.client(transport=mode) as c:
        layout = create(c)
        tokens = np.arange(5 * PAGE + 2)  # five full pages and a tail
        kv = random_kv(layout, 5)
        assert put_all(c, tokens, kv) == [5, 5, 5]
        # one OpenPut; commits are pipelined and merged while one is in flight: 1 to 3 calls
        assert cluster.master.calls["OpenPut"] == 1 and 1 <= cluster.master.calls["CommitLayer"] <= 3
        assert len(c._sessions) == 0  # the master said done: forgotten
        # the commit checksums are the shard hashes, per (layer, page), whatever node each page is on
        page_keys = keys.page_keys(keys.namespace_root(NAMESPACE), tokens, PAGE)
        assert {cluster.master.pages[k].node for k in page_keys} == {0, 1}
        for p, key in enumerate(page_keys):
            for layer in range(LAYERS):
                want = xxhash.xxh3_64_intdigest(kv[layer, p].tobytes())
                assert cluster.master.pages[key].checksums[(layer, 0, KV_HEADS)] == want

        hit = c.get_prefix(tokens)
        assert (hit.num_pages, hit.num_tokens, hit.layers) == (5, 20, [0, 1, 2])
        for layer in range(LAYERS):
            np.testing.assert_array_equal(hit.layer(layer), kv[layer])
        # its own lease was released (in the background: get_prefix does not wait for the answer)
        wait_for(lambda: cluster.master.leases == {}, 5.0, "get_prefix's own lease released")
        assert c.match_prefix(tokens) == 20
        assert c.match_prefix(np.arange(100, 120)) == 0

        out = np.zeros((1, 5, layout.segment_bytes), dtype=np.uint8)
        hit = c.get_prefix(tokens, layers=[2], out=out)
        assert np.shares_memory(hit.data, out)
        np.testing.assert_array_equal(out[0], kv[2])

        # written again: every page is already stored
        assert c.put_layer(tokens, 0, kv[0]) == 0
    used = {"auto": "shm", "tcp": "tcp"}[mode]
    served = sum(n.requests["read"] + n.requests["write"] for n in cluster.nodes)
    assert (served > 0) == (used == "tcp")


def test_tensor_parallel_writers_and_a_resharding_reader(cluster: Cluster, mode: str) -> None:
    with cluster.client(transport=mode) as c:
        layout = create(c)
        tokens = np.arange(3 * PAGE)
        full = random_kv(layout, 3, seed=5)  # [layers, pages, K|V x heads x page x dim]
        by_head = full.reshape(LAYERS, 3, 2, KV_HEADS, layout.head_bytes)
        for rank in range(2):
            h0, h1 = layout.head_range(rank, 2)
            shard = np.ascontiguousarray(by_head[:, :, :, h0:h1]).reshape(LAYERS, 3, -1)
            assert put_all(c, tokens, shard, rank, 2) == [3, 3, 3]
            assert c.match_prefix(tokens) == (0 if rank == 0 else 12)  # complete only with every head
        hit = c.get_prefix(tokens)
        np.testing.assert_array_equal(hit.data, full)
        middle = c.get_prefix(tokens, layers=[1], heads=(1, 3))
        np.testing.assert_array_equal(middle.layer(1).reshape(3, 2, 2, -1), by_head[1, :, :, 1:3])


def test_shared_prefix_writes_only_new_pages(cluster: Cluster) -> None:
    with cluster.client() as c:
        layout = create(c)
        first = np.arange(3 * PAGE)
        put_all(c, first, random_kv(layout, 3))
        second = np.concatenate([first[: 2 * PAGE], np.arange(500, 500 + 2 * PAGE)])
        assert put_all(c, second, random_kv(layout, 4, seed=1)) == [2, 2, 2]
        assert c.match_prefix(second) == 4 * PAGE


def test_no_room_pages_are_skipped(cluster: Cluster) -> None:
    cluster.master.capacity_pages = 2
    with cluster.client() as c:
        layout = create(c)
        tokens = np.arange(4 * PAGE)
        kv = random_kv(layout, 4)
        assert put_all(c, tokens, kv) == [2, 2, 2]
        hit = c.get_prefix(tokens)
        assert hit.num_pages == 2
        np.testing.assert_array_equal(hit.data, kv[:, :2])


def test_leases(cluster: Cluster, mode: str) -> None:
    with cluster.client(transport=mode) as writer, cluster.client(transport=mode) as reader:
        layout = create(writer)
        tokens = np.arange(4 * PAGE)
        kv = random_kv(layout, 4)
        put_all(writer, tokens, kv)

        lease = writer.acquire_prefix(tokens)
        assert (lease.num_pages, lease.num_tokens) == (4, 16) and len(cluster.master.leases) == 1
        hit = writer.get_prefix(tokens, lease=lease)  # same process: the lease's own answer, no RPC
        assert hit.num_pages == 4 and cluster.master.calls["DescribeLease"] == 0
        assert lease.lease_id in cluster.master.leases  # a caller's lease is never released for it
        # another process with only the id; its tokens share two pages with the lease
        other = np.concatenate([tokens[: 2 * PAGE], np.arange(900, 900 + 2 * PAGE)])
        hit = reader.get_prefix(other, layers=[0], lease=lease.lease_id)
        assert hit.num_pages == 2 and cluster.master.calls["DescribeLease"] == 1
        np.testing.assert_array_equal(hit.data[0], kv[0, :2])
        assert cluster.master.calls["AcquirePrefix"] == 1
        shipped = pickle.loads(pickle.dumps(lease))  # as a scheduler hands it to a worker process
        assert shipped == lease and reader.get_prefix(tokens, lease=shipped).num_pages == 4
        assert cluster.master.calls["DescribeLease"] == 2
        assert reader.release(lease.lease_id) is True
        assert writer.release(lease) is False
        with pytest.raises(KVStoreError) as info:
            reader.get_prefix(tokens, lease="no-such-lease")
        assert info.value.code is ErrorCode.LEASE_NOT_FOUND


def test_slot_reused_under_a_reader_truncates_the_hit(cluster: Cluster, mode: str) -> None:
    with cluster.client(transport=mode) as c:
        layout = create(c)
        tokens = np.arange(4 * PAGE)
        kv = random_kv(layout, 4)
        put_all(c, tokens, kv)
        lease = c.acquire_prefix(tokens)
        cluster.master.free(keys.page_keys(keys.namespace_root(NAMESPACE), tokens, PAGE)[2])
        hit = c.get_prefix(tokens, lease=lease)
        # shm checks each page's generation; a data server refuses the whole request of that node
        # (pages 0 and 2 live on node 0), which costs page 0 too
        assert hit.num_pages == (2 if mode == "auto" else 0)
        np.testing.assert_array_equal(hit.data, kv[:, : hit.num_pages])


def test_tcp_corruption_and_bad_trailer_are_misses(cluster: Cluster) -> None:
    with cluster.client(transport="tcp") as c:
        layout = create(c)
        tokens = np.arange(4 * PAGE)
        kv = random_kv(layout, 4)
        put_all(c, tokens, kv)
        cluster.nodes[1].corrupt_reads = True  # node 1 holds pages 1 and 3; its first range is page 1
        assert c.get_prefix(tokens).num_pages == 1
        cluster.nodes[1].corrupt_reads = False
        cluster.nodes[1].trailer_zero = True
        assert c.get_prefix(tokens).num_pages == 1
        cluster.nodes[1].trailer_zero = False
        hit = c.get_prefix(tokens)
        assert hit.num_pages == 4
        np.testing.assert_array_equal(hit.data, kv)


def test_dead_data_server_is_a_miss_on_read_and_an_error_on_write(cluster: Cluster) -> None:
    with cluster.client(transport="tcp") as c:
        layout = create(c)
        tokens = np.arange(4 * PAGE)
        put_all(c, tokens, random_kv(layout, 4))
        cluster.nodes[1].stop()
        started = time.monotonic()
        assert c.get_prefix(tokens).num_pages == 1
        assert time.monotonic() - started < 3.0
        more = np.arange(1000, 1000 + 4 * PAGE)
        with pytest.raises(KVStoreError) as info:
            c.put_layer(more, 0, random_kv(layout, 4)[0])
        assert info.value.code is ErrorCode.UNAVAILABLE
        assert cluster.master.calls["AbortPut"] == 1 and len(c._sessions) == 0


def test_lost_session_on_shm_write(cluster: Cluster) -> None:
    with cluster.client(transport="shm") as c:
        layout = create(c)
        tokens = np.arange(2 * PAGE)
        kv = random_kv(layout, 2)
        c.put_layer(tokens, 0, kv[0])
        cluster.master.free(keys.page_keys(keys.namespace_root(NAMESPACE), tokens, PAGE)[1])
        with pytest.raises(KVStoreError) as info:
            c.put_layer(tokens, 1, kv[1])
        assert info.value.code is ErrorCode.SESSION_NOT_FOUND
        assert len(c._sessions) == 0


def test_a_pipelined_commit_that_failed_surfaces_on_the_next_put_layer(cluster: Cluster) -> None:
    with cluster.client() as c:
        layout = create(c)
        tokens = np.arange(3 * PAGE)
        kv = random_kv(layout, 3)
        cluster.master.failing_commits = 1
        assert c.put_layer(tokens, 0, kv[0]) == 3  # its commit went out; nobody waited for it
        wait_for(lambda: cluster.master.calls["CommitLayer"] == 1, 5.0, "the first commit to be answered")
        with pytest.raises(KVStoreError) as info:
            # the failure surfaces at the next put_layer that sees it, at the latest the last one
            for layer in range(1, LAYERS):
                c.put_layer(tokens, layer, kv[layer])
        assert info.value.code is ErrorCode.INTERNAL and "refused by the test" in info.value.message
        assert cluster.master.calls["AbortPut"] == 1 and len(c._sessions) == 0
        # the sequence starts over and completes: the last layer waits for every commit
        assert put_all(c, tokens, kv) == [3] * LAYERS
        assert cluster.master.calls["OpenPut"] == 2
        assert all(page.complete for page in cluster.master.pages.values())


def test_abort_and_close_end_unfinished_puts(cluster: Cluster) -> None:
    c = cluster.client()
    layout = create(c)
    tokens = np.arange(3 * PAGE)
    kv = random_kv(layout, 3)
    c.put_layer(tokens, 0, kv[0])
    assert c.abort(tokens) == 3
    assert c.abort(tokens) == 0  # nothing open any more
    assert c.put_layer(tokens, 0, kv[0]) == 3  # a fresh session
    assert cluster.master.calls["OpenPut"] == 2
    c.close()
    assert cluster.master.calls["AbortPut"] == 2
    assert cluster.master.pages == {}


def test_a_token_sequence_names_the_same_session_as_its_tokens(cluster: Cluster) -> None:
    """Contexts and tensor-parallel ranks included: a TokenSequence and the plain tokens are one session."""
    c = cluster.client()
    layout = create(c)
    tokens = np.arange(3 * PAGE + 2)
    seq = keys.TokenSequence(tokens)
    contexts = [b"img-a", b"", b"img-c"]
    kv = random_kv(layout, 3)
    assert c.put_layer(tokens, 0, kv[0], contexts=contexts) == 3
    assert c.put_layer(seq, 1, kv[1], contexts=contexts) == 3
    assert cluster.master.calls["OpenPut"] == 1
    assert c.abort(seq, contexts=contexts) == 3  # the plain tokens' session, ended by the sequence
    assert c.abort(tokens, contexts=contexts) == 0
    c.close()


def test_layers_from_several_threads_share_one_session(cluster: Cluster) -> None:
    with cluster.client() as c:
        layout = create(c)
        tokens = np.arange(6 * PAGE)
        kv = random_kv(layout, 6)
        barrier = threading.Barrier(LAYERS)

        def put(layer: int) -> int:
            barrier.wait()
            return c.put_layer(tokens, layer, kv[layer])

        with futures.ThreadPoolExecutor(LAYERS) as pool:
            assert list(pool.map(put, range(LAYERS))) == [6] * LAYERS
        assert cluster.master.calls["OpenPut"] == 1
        np.testing.assert_array_equal(c.get_prefix(tokens).data, kv)


def test_second_client_fetches_the_namespace_and_salt_isolates(cluster: Cluster) -> None:
    with cluster.client() as writer:
        layout = create(writer)
        tokens = np.arange(2 * PAGE)
        kv = random_kv(layout, 2)
        put_all(writer, tokens, kv)
    with cluster.client() as reader:
        np.testing.assert_array_equal(reader.get_prefix(tokens).data, kv)
        assert cluster.master.calls["GetNamespace"] == 1
        assert reader.layout == layout
    with cluster.client(salt=b"tenant-b") as other:
        assert other.match_prefix(tokens) == 0


def test_extras(cluster: Cluster) -> None:
    with cluster.client() as c:
        create(c)
        tokens = np.arange(7)
        c.put_extra(tokens, "first_token", np.array([42], dtype=np.int32))
        assert c.get_extra(tokens, "first_token") == np.array([42], dtype=np.int32).tobytes()
        assert c.get_extra(np.arange(8), "first_token") is None  # the tail is part of the key
        assert c.get_extra(tokens, "hidden") is None


def test_async_client(cluster: Cluster) -> None:
    async def main() -> None:
        async with AsyncKVStoreClient(cluster.address, NAMESPACE, rpc_timeout_ms=5000) as c:
            layout = await c.create_namespace(
                PAGE, LAYERS, kind="mha", kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="float16"
            )
            tokens = np.arange(2 * PAGE)
            kv = random_kv(layout, 2)
            assert (
                await asyncio.gather(*(c.put_layer(tokens, i, kv[i]) for i in range(LAYERS))) == [2] * LAYERS
            )
            lease = await c.acquire_prefix(tokens)
            hit = await c.get_prefix(tokens, lease=lease)
            assert await c.release(lease)
            np.testing.assert_array_equal(hit.data, kv)
            assert await c.match_prefix(tokens) == 2 * PAGE

    asyncio.run(main())
