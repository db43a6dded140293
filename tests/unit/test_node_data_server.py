"""The node's TCP data server over a real socket, with a tiny raw client built on tcp_wire."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import xxhash

from kvstore import grants, native
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.node.data_server import DataServer, open_listener
from kvstore.node.inventory import Inventory
from kvstore.node.state import NodeState
from kvstore.tiers.dram import DramPool
from kvstore.transports import tcp_wire

SECRET = bytes(range(32))
NODE_ID = "node-test"
SLOT_BYTES = 64 << 10
POOL_BYTES = 4 << 20
TERM = 3
SLOTS = [0, SLOT_BYTES, 4 * SLOT_BYTES]  # assigned slots
GENERATIONS = [11, 12, 13]


class Harness:
    def __init__(self, tmp_path, max_request_bytes: int = 64 << 20) -> None:
        self.pool = DramPool.create(str(tmp_path), NODE_ID, POOL_BYTES, prefault=False)
        self.inventory = Inventory(self.pool.capacity_bytes)
        self.state = NodeState(NODE_ID, self.pool.header.incarnation, SECRET)
        self.state.observe_term(TERM)
        slots = np.array(SLOTS, dtype=np.uint64)
        gens = np.array(GENERATIONS, dtype=np.uint32)
        n = len(SLOTS)
        self.inventory.assign(
            slots, gens, b"k" * 16 * n, b"\0" * 16 * n, np.full(n, SLOT_BYTES, dtype=np.uint64), ["ns"] * n
        )
        self.pool.set_generation(slots, gens)
        self.server = DataServer(
            open_listener("127.0.0.1", 0), self.pool, self.inventory, self.state, max_request_bytes
        )
        self.server.start()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def grant(
        self,
        rights: int = grants.WRITE | grants.READ,
        slots: list[int] = SLOTS,
        generations: list[int] = GENERATIONS,
        expires_ms: int | None = None,
        term: int = TERM,
        secret: bytes = SECRET,
    ) -> pb.Grant:
        return grants.sign(
            secret,
            NODE_ID,
            self.pool.header.incarnation,
            np.array(slots, dtype=np.uint64),
            np.array(generations, dtype=np.uint32),
            int(time.time() * 1000) + 60_000 if expires_ms is None else expires_ms,
            term,
            rights,
        )

    def close(self) -> None:
        self.server.stop()
        self.pool.close()


@pytest.fixture
def node(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def write(
    sock: socket.socket,
    grant: pb.Grant,
    ops: list[tuple[int, int, int]],
    payload: bytes,
    hashes: list[int] | None = None,
) -> None:
    table = np.array(ops, dtype=np.uint64).reshape(-1, 3)
    if hashes is None:
        hashes = []
        pos = 0
        for _, _, length in ops:
            hashes.append(xxhash.xxh3_64_intdigest(payload[pos : pos + length]))
            pos += length
    head = tcp_wire.encode_request_head(tcp_wire.OP_WRITE, grant.SerializeToString(), table, len(payload))
    sock.sendall(head + payload + np.array(hashes, dtype="<u8").tobytes())
    assert tcp_wire.read_response_head(sock) == 0


def read(
    sock: socket.socket, grant: pb.Grant, ops: list[tuple[int, int, int]]
) -> tuple[list[int], bytes, int]:
    table = np.array(ops, dtype=np.uint64).reshape(-1, 3)
    sock.sendall(tcp_wire.encode_request_head(tcp_wire.OP_READ, grant.SerializeToString(), table, 0))
    payload_len = tcp_wire.read_response_head(sock)
    payload = tcp_wire.recv_exact(sock, payload_len)
    hashes = np.frombuffer(tcp_wire.recv_exact(sock, 8 * len(ops)), dtype="<u8").tolist()
    trailer = tcp_wire.recv_exact(sock, 1)[0]
    return hashes, payload, trailer


def expect_error(code: ErrorCode, fn, *args, match: str = "") -> KVStoreError:
    with pytest.raises(KVStoreError) as info:
        fn(*args)
    assert info.value.code is code, info.value
    assert match in info.value.message
    return info.value


def test_write_then_read_back(node):
    data = np.random.default_rng(1).integers(0, 256, 3 * 10000, dtype=np.uint8).tobytes()
    ops = [(SLOTS[0], 0, 10000), (SLOTS[1], 4096, 10000), (SLOTS[2], SLOT_BYTES - 10000, 10000)]
    with node.connect() as sock:
        write(sock, node.grant(), ops, data)
        hashes, payload, trailer = read(sock, node.grant(rights=grants.READ), ops)
    assert payload == data
    assert trailer == 1
    assert hashes == [xxhash.xxh3_64_intdigest(data[i * 10000 : (i + 1) * 10000]) for i in range(3)]
    # the bytes really are in the pool, where the slot offsets say
    base = node.pool.header.data_offset
    assert bytes(node.pool.bytes[base + SLOTS[1] + 4096 : base + SLOTS[1] + 14096]) == data[10000:20000]
    assert node.server.stats.bytes_written == len(data)
    assert node.server.stats.bytes_read == len(data)
    assert node.server.stats.grant_rejections == 0


def test_many_ranges_in_one_request(node):
    # 800 segments (more than one sendmsg/recvmsg batch), some adjacent (merged), some not.
    seg = 64
    ops = [(SLOTS[i % 3], (i // 3) * 2 * seg + (i % 2) * seg, seg) for i in range(800)]
    data = np.random.default_rng(2).integers(0, 256, seg * len(ops), dtype=np.uint8).tobytes()
    with node.connect() as sock:
        write(sock, node.grant(), ops, data)
        hashes, payload, trailer = read(sock, node.grant(), ops)
    assert payload == data and trailer == 1
    assert hashes[-1] == xxhash.xxh3_64_intdigest(data[-seg:])


def test_empty_request(node):
    with node.connect() as sock:
        write(sock, node.grant(), [], b"")
        assert read(sock, node.grant(), []) == ([], b"", 1)


def test_forged_mac_is_rejected(node):
    grant = node.grant()
    grant.mac = bytes(32)
    with node.connect() as sock:
        expect_error(ErrorCode.BAD_GRANT, write, sock, grant, [(0, 0, 4)], b"abcd", match="signature")
        # a grant signed with another key is a forgery too
        expect_error(ErrorCode.BAD_GRANT, write, sock, node.grant(secret=b"x" * 32), [(0, 0, 4)], b"abcd")
        # the connection is still in step: a good request works
        write(sock, node.grant(), [(0, 0, 4)], b"abcd")
    assert node.server.stats.grant_rejections == 2


def test_tampered_grant_is_rejected(node):
    grant = node.grant(rights=grants.READ)
    grant.rights = grants.READ | grants.WRITE  # widen the rights without re-signing
    with node.connect() as sock:
        expect_error(ErrorCode.BAD_GRANT, write, sock, grant, [(0, 0, 4)], b"abcd", match="signature")


def test_expired_grant_is_rejected(node):
    grant = node.grant(expires_ms=int(time.time() * 1000) - 1000)
    with node.connect() as sock:
        expect_error(ErrorCode.BAD_GRANT, write, sock, grant, [(0, 0, 4)], b"abcd", match="expired")
        expect_error(ErrorCode.BAD_GRANT, read, sock, grant, [(0, 0, 4)], match="expired")


def test_generation_mismatch_is_rejected(node):
    stale = node.grant(generations=[10, 12, 13])  # slot 0 has moved on to generation 11
    with node.connect() as sock:
        expect_error(ErrorCode.BAD_GRANT, write, sock, stale, [(0, 0, 4)], b"abcd", match="generation")
        # slot 1 is at the grant's generation: the same grant still works there
        write(sock, stale, [(SLOTS[1], 0, 4)], b"abcd")
        # free slot 1 (generation bumped): the grant no longer works for it
        node.pool.set_generation(np.array([SLOTS[1]], dtype=np.uint64), np.array([99], dtype=np.uint32))
        expect_error(ErrorCode.BAD_GRANT, read, sock, stale, [(SLOTS[1], 0, 4)], match="generation")


def test_slot_not_in_grant_is_rejected(node):
    grant = node.grant(slots=[SLOTS[0]], generations=[GENERATIONS[0]])
    with node.connect() as sock:
        expect_error(
            ErrorCode.BAD_GRANT,
            write,
            sock,
            grant,
            [(0, 0, 4), (SLOTS[1], 0, 4)],
            b"abcdefgh",
            match="does not cover",
        )
        expect_error(ErrorCode.BAD_GRANT, read, sock, grant, [(SLOTS[2], 0, 4)], match="does not cover")


def test_rights_are_enforced(node):
    with node.connect() as sock:
        expect_error(
            ErrorCode.BAD_GRANT,
            write,
            sock,
            node.grant(rights=grants.READ),
            [(0, 0, 4)],
            b"abcd",
            match="rights",
        )
        expect_error(
            ErrorCode.BAD_GRANT, read, sock, node.grant(rights=grants.WRITE), [(0, 0, 4)], match="rights"
        )


def test_grant_from_an_older_term_is_rejected(node):
    with node.connect() as sock:
        expect_error(
            ErrorCode.BAD_GRANT, write, sock, node.grant(term=TERM - 1), [(0, 0, 4)], b"abcd", match="term"
        )


def test_grant_for_another_incarnation_is_rejected(node):
    grant = grants.sign(
        SECRET,
        NODE_ID,
        b"\x01" * 16,
        np.array(SLOTS, dtype=np.uint64),
        np.array(GENERATIONS, dtype=np.uint32),
        int(time.time() * 1000) + 60_000,
        TERM,
        3,
    )
    with node.connect() as sock:
        expect_error(ErrorCode.BAD_GRANT, write, sock, grant, [(0, 0, 4)], b"abcd", match="incarnation")


def test_garbled_grant_is_rejected(node):
    with node.connect() as sock:
        table = np.array([(0, 0, 4)], dtype=np.uint64)
        sock.sendall(tcp_wire.encode_request_head(tcp_wire.OP_READ, b"\xff\xff\xff", table, 0))
        expect_error(ErrorCode.BAD_GRANT, tcp_wire.read_response_head, sock, match="parse")


def test_node_without_a_grant_key_rejects_everything(node):
    node.state.grant_secret = None
    with node.connect() as sock:
        expect_error(ErrorCode.BAD_GRANT, write, sock, node.grant(), [(0, 0, 4)], b"abcd", match="grant key")


def test_range_past_the_slot_end_is_rejected(node):
    with node.connect() as sock:
        expect_error(ErrorCode.BAD_RANGE, write, sock, node.grant(), [(0, SLOT_BYTES - 2, 4)], b"abcd")
        expect_error(ErrorCode.BAD_RANGE, read, sock, node.grant(), [(0, SLOT_BYTES + 4096, 0)])
        # an offset that would wrap a 64-bit sum
        expect_error(ErrorCode.BAD_RANGE, read, sock, node.grant(), [(0, 2**64 - 2, 4)])


def test_unassigned_slot_has_no_room_even_with_a_grant(node):
    free_slot = 8 * SLOT_BYTES
    grant = node.grant(slots=[free_slot], generations=[0])
    with node.connect() as sock:
        expect_error(ErrorCode.BAD_RANGE, write, sock, grant, [(free_slot, 0, 4)], b"abcd")


def test_misaligned_or_outside_slot_offsets_are_rejected(node):
    with node.connect() as sock:
        expect_error(
            ErrorCode.INVALID_ARGUMENT, read, sock, node.grant(slots=[100], generations=[0]), [(100, 0, 4)]
        )
        expect_error(
            ErrorCode.INVALID_ARGUMENT,
            read,
            sock,
            node.grant(slots=[POOL_BYTES], generations=[0]),
            [(POOL_BYTES, 0, 4)],
        )


def test_wrong_hashes_give_checksum_mismatch_and_the_stream_stays_in_step(node):
    ops = [(0, 0, 8), (SLOTS[1], 0, 8)]
    with node.connect() as sock:
        expect_error(
            ErrorCode.INVALID_ARGUMENT,
            write,
            sock,
            node.grant(),
            ops,
            b"abcdefgh12345678",
            [xxhash.xxh3_64_intdigest(b"abcdefgh"), 12345],
            match="checksum mismatch",
        )
        write(sock, node.grant(), ops, b"abcdefgh12345678")
        assert read(sock, node.grant(), ops)[1] == b"abcdefgh12345678"


def test_payload_length_must_match_the_ranges(node):
    with node.connect() as sock:
        table = np.array([(0, 0, 8)], dtype=np.uint64)
        head = tcp_wire.encode_request_head(tcp_wire.OP_WRITE, node.grant().SerializeToString(), table, 4)
        sock.sendall(head + b"abcd" + b"\0" * 8)
        expect_error(ErrorCode.INVALID_ARGUMENT, tcp_wire.read_response_head, sock, match="add up")
        write(sock, node.grant(), [(0, 0, 4)], b"abcd")  # the 4 payload bytes and the hashes were drained


def test_too_large_request_is_refused_and_the_connection_closed(tmp_path):
    h = Harness(tmp_path, max_request_bytes=1 << 20)
    try:
        with h.connect() as sock:
            table = np.array([(0, 0, 2 << 20)], dtype=np.uint64)
            sock.sendall(
                tcp_wire.encode_request_head(tcp_wire.OP_WRITE, h.grant().SerializeToString(), table, 2 << 20)
            )
            expect_error(ErrorCode.TOO_LARGE, tcp_wire.read_response_head, sock)
            assert sock.recv(1) == b""  # closed: 2 MiB of payload was not worth draining
        with h.connect() as sock:
            expect_error(ErrorCode.TOO_LARGE, read, sock, h.grant(), [(0, 0, 2 << 20)])
            write(sock, h.grant(), [(0, 0, 4)], b"abcd")
    finally:
        h.close()


def test_garbage_header_closes_the_connection_only(node):
    with node.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 16)
        expect_error(ErrorCode.INVALID_ARGUMENT, tcp_wire.read_response_head, sock)
        assert sock.recv(1) == b""
    with node.connect() as sock:
        write(sock, node.grant(), [(0, 0, 4)], b"abcd")


def test_client_vanishing_mid_payload_leaves_the_server_serving(node):
    size = 32 << 10
    with node.connect() as sock:
        table = np.array([(0, 0, size)], dtype=np.uint64)
        head = tcp_wire.encode_request_head(tcp_wire.OP_WRITE, node.grant().SerializeToString(), table, size)
        sock.sendall(head + b"x" * (size // 2))  # half the payload, then gone
    # a client that resets the connection (RST) mid-payload
    sock = node.connect()
    sock.sendall(head + b"y" * 100)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    deadline = time.time() + 5
    while node.server._conns and time.time() < deadline:  # the two threads end on their own
        time.sleep(0.01)
    assert not node.server._conns
    with node.connect() as sock:
        write(sock, node.grant(), [(SLOTS[1], 0, 5)], b"fresh")
        assert read(sock, node.grant(), [(SLOTS[1], 0, 5)])[1] == b"fresh"


def test_concurrent_clients(node):
    errors: list[BaseException] = []

    def worker(slot: int, seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            with node.connect() as sock:
                for _ in range(20):
                    data = rng.integers(0, 256, 8192, dtype=np.uint8).tobytes()
                    write(sock, node.grant(), [(slot, 0, 8192)], data)
                    assert read(sock, node.grant(), [(slot, 0, 8192)])[1] == data
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(slot, i)) for i, slot in enumerate(SLOTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


class _GenerationFlipsDuringSend:
    """A tier whose generations move on after the request was checked (as if the slot were freed mid-read)."""

    def __init__(self, pool: DramPool) -> None:
        self._pool = pool
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self._pool, name)

    def generation(self, slots: np.ndarray) -> np.ndarray:
        self.calls += 1
        gens = self._pool.generation(slots)
        return gens if self.calls == 1 else gens + 1


def test_read_trailer_reports_a_generation_change(node):
    with node.connect() as sock:
        write(sock, node.grant(), [(0, 0, 4)], b"abcd")
    tier = _GenerationFlipsDuringSend(node.pool)
    server = DataServer(open_listener("127.0.0.1", 0), tier, node.inventory, node.state, 1 << 20)  # type: ignore[arg-type]
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            hashes, payload, trailer = read(sock, node.grant(), [(0, 0, 4)])
        assert payload == b"abcd" and trailer == 0
    finally:
        server.stop()


def test_stop_ends_idle_connections(tmp_path):
    h = Harness(tmp_path)
    sock = h.connect()
    write(sock, h.grant(), [(0, 0, 4)], b"abcd")
    started = time.time()
    h.close()
    assert time.time() - started < 3
    assert sock.recv(1) == b""
    sock.close()


@pytest.mark.parametrize("staging_bytes", [0, 64, native.STAGING_BYTES])
def test_native_recv_ranges_handles_partial_receives(staging_bytes):
    # staging: every receive lands in the buffer first, then is hashed and stream-copied into the
    # ranges (64 bytes: pieces that end mid-range and span several ranges)
    staging = np.zeros(staging_bytes, dtype=np.uint8) if staging_bytes else None
    a, b = socket.socketpair()
    with a, b:
        bufs = [np.zeros(n, dtype=np.uint8) for n in (3, 0, 700, 1, 5000)]
        data = (bytes(range(256)) * 23)[: sum(len(x) for x in bufs)]

        def sender() -> None:
            for i in range(0, len(data), 97):  # dribble it in small pieces
                a.sendall(data[i : i + 97])

        t = threading.Thread(target=sender)
        t.start()
        ranges = np.array([(native.address_of(x), len(x)) for x in bufs], dtype=np.uint64)
        hashes = native.recv_ranges(b, ranges, with_hashes=True, staging=staging)
        t.join()
        assert b"".join(x.tobytes() for x in bufs) == data
        assert hashes is not None and hashes.tolist() == [xxhash.xxh3_64_intdigest(x.tobytes()) for x in bufs]
        a.close()
        with pytest.raises(ConnectionError):
            native.recv_ranges(
                b, np.array([(native.address_of(bufs[4]), 10)], dtype=np.uint64), staging=staging
            )


@pytest.mark.parametrize("staging_bytes", [64, 100, native.STAGING_BYTES])
def test_native_staged_receive_hashes_every_range_shape(staging_bytes):
    # staged receives hash each range as its pieces land and stream-copy them out: every tail after
    # XXH3's last whole stripe, its 1 KiB blocks, short and unaligned ranges between them, pieces
    # of odd sizes split across receives
    lengths = [241, 256, 300, 1024, 1025, 4096 + 63, 64 << 10, (64 << 10) + 1, (1 << 20) + 33]
    lengths += [5000 + k for k in range(0, 130, 7)] + [17, 0, 240]
    rng = np.random.default_rng(3)
    arena = np.zeros(sum(lengths) + 64 * len(lengths) + 64, dtype=np.uint8)
    bufs, at = [], (-arena.ctypes.data) % 16
    for i, n in enumerate(lengths):
        at += 3 if i % 5 == 4 else 0  # a few ranges unaligned
        bufs.append(arena[at : at + n])
        at = ((at + n + 15) // 16) * 16
    data = rng.integers(0, 256, sum(lengths), dtype=np.uint8).tobytes()
    a, b = socket.socketpair()
    with a, b:

        def sender() -> None:
            for i in range(0, len(data), 9_973):  # odd pieces: stripes split between receives
                a.sendall(data[i : i + 9_973])

        t = threading.Thread(target=sender)
        t.start()
        ranges = np.array([(native.address_of(x) if len(x) else 0, len(x)) for x in bufs], dtype=np.uint64)
        hashes = native.recv_ranges(b, ranges, with_hashes=True, staging=np.zeros(staging_bytes, np.uint8))
        t.join()
    assert b"".join(x.tobytes() for x in bufs) == data
    assert hashes is not None
    assert hashes.tolist() == [xxhash.xxh3_64_intdigest(x.tobytes()) for x in bufs]


def test_native_staging_buffer_is_checked():
    a, b = socket.socketpair()
    with a, b:
        ranges = np.zeros((0, 2), dtype=np.uint64)
        with pytest.raises(ValueError, match="empty"):
            native.recv_ranges(b, ranges, staging=np.zeros(0, dtype=np.uint8))
        with pytest.raises(ValueError, match="no staging"):
            native._native.send(a.fileno(), ranges, None, -1, np.zeros(8, dtype=np.uint8))
