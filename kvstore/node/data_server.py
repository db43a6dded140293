"""The node's TCP data server: moves bytes between remote clients and the tier (DESIGN.md, "Transports").

Wire format: kvstore.transports.tcp_wire.  One thread per connection with
blocking sockets, never the asyncio loop: a slow client must not stall the
node's control plane, and recv/send/hash all release the GIL.

Every request is checked in full before a payload byte lands in the pool:
grant signature, node, incarnation, expiry, rights and term; every range's slot
covered by the grant at the generation the pool header shows now; every range
inside its slot as the inventory knows it.  A rejected WRITE still has its
payload drained so the stream stays in sync; a request whose framing cannot be
trusted (garbage header, oversized payload) closes the connection instead.
A WRITE lands in the pool through the connection's small staging buffer (one
native receive loop, GIL released: each system call's bytes land in the buffer,
are hashed there and stream-copied into their ranges, so the pool's cold lines
are written without being read first) and is compared with the client's hashes,
which follow the payload.  A READ is sent straight from the mapping (one native
gather send, hashing as it goes out), then its hashes and a trailer that says
whether every slot kept its generation through the send.

vram: a grant naming the VRAM region (``Grant.tier``, covered by its MAC) is
served from that region with the same checks; its bytes are device memory, so a
WRITE lands in a pinned staging buffer (hashed as it lands, compared) and one
kernel launch copies it in, and a READ is copied out into the staging buffer by
one launch before it is sent (kvstore.tiers.vram.VramRegion.staged).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from kvstore import grants, native
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.node.inventory import Inventory
from kvstore.node.state import NodeState
from kvstore.tiers.base import Tier
from kvstore.transports import tcp_wire

log = logging.getLogger("kvstore.node.data")

DRAIN_CHUNK = 1 << 20
# how long a connection closed for a bad request keeps discarding input so the answer gets through
LINGER_S = 1.0
OP_BYTES = tcp_wire.OP_ROW * 8
HASH_BYTES = 8


class DataStats:
    """Counters of the data server (read by GetStats)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_written = 0
        self.bytes_read = 0
        self.grant_rejections = 0
        self.requests = 0

    def add(self, written: int = 0, read: int = 0, rejected: int = 0) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_written += written
            self.bytes_read += read
            self.grant_rejections += rejected


def open_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind the data-server socket (port 0: any free port); serving starts with DataServer.start."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # No SO_RCVBUF/SO_SNDBUF: setting them turns off the kernel's buffer autotuning, which
        # measured here costs a quarter of a loopback stream (5.8 -> 4.2 GB/s with 4 MiB buffers).
        listener.bind(address)
        listener.listen(backlog)
    except BaseException:
        listener.close()
        raise
    return listener


@dataclass(frozen=True)
class _Checked:
    """A request that passed every check: where its ranges live and at which generations."""

    slots: np.ndarray  # u64 slot offset per range
    starts: np.ndarray  # u64 byte offset of each range in the slot area
    lengths: np.ndarray  # u64
    granted: np.ndarray  # u32 generation the grant names per range
    total: int
    region: Tier  # the tier region the grant names (the DRAM pool, or the VRAM region)


class DataServer:
    """Serves WRITE and READ requests for one tier region on a listening socket."""

    def __init__(
        self,
        listener: socket.socket,
        tier: Tier,
        inventory: Inventory,
        state: NodeState,
        max_request_bytes: int,
        hash_threads: int = 1,
        others: dict[str, tuple[Tier, Inventory]] | None = None,
    ) -> None:
        self._listener = listener
        self._tier = tier
        self._inventory = inventory
        # vram: other regions served by grant tier ("vram": device memory, staged)
        self._others = dict(others or {})
        self._state = state
        self.max_request_bytes = max_request_bytes
        # Kept for the node's flags: hashing now happens inside each connection's receive or
        # send (one pass, in cache), on that connection's thread, so there is nothing to split.
        self._hash_threads = max(1, hash_threads)
        # Connections move bytes by address into the mapping; this view keeps it mapped until stop().
        self._data: memoryview | None = tier.data_view()
        self.stats = DataStats()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    # -- lifecycle
    def start(self) -> None:
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="kvstore-data-accept", daemon=True
        )
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut open connections and wait for their threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in [*threads, self._accept_thread]:
            if thread is not None:
                thread.join(timeout)
        if self._data is not None:
            try:
                self._data.release()
            except BufferError:
                log.debug("a data-plane view is still exported; the mapping goes with the process")
            self._data = None

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("data server accept failed")
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve_connection, args=(conn, peer), name=f"kvstore-data-{peer}", daemon=True
            )
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
                self._threads.add(thread)
            thread.start()

    def _serve_connection(self, conn: socket.socket, peer: object) -> None:
        staging = native.staging_buffer()  # this connection's WRITEs land here first (recv_ranges)
        try:
            while not self._stopping.is_set() and self._serve_one(conn, staging):
                pass
        except (ConnectionError, OSError) as exc:
            # A client that vanishes mid-request ends only its own connection; a half-written
            # slot stays uncommitted and the master reclaims it with the session.
            log.debug("data connection from %s ended: %s", peer, exc)
        except Exception:  # noqa: BLE001 - one connection's bug must not take the server down
            log.exception("data connection from %s failed", peer)
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    # -- one request
    def _serve_one(self, conn: socket.socket, staging: np.ndarray) -> bool:
        """Serve one request; False when the connection should close."""
        header = bytearray(tcp_wire.REQUEST_HEADER.size)
        view = memoryview(header)
        got = conn.recv_into(view)
        if got == 0:
            return False  # clean close between requests
        tcp_wire.recv_exact_into(conn, view[got:])
        try:
            op, grant_len, nops, payload_len = tcp_wire.decode_request_header(bytes(header))
            if op == tcp_wire.OP_READ and payload_len:
                raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "a READ request carries no payload")
            if payload_len > self.max_request_bytes:
                raise KVStoreError(
                    ErrorCode.TOO_LARGE, f"request of {payload_len} bytes exceeds {self.max_request_bytes}"
                )
        except KVStoreError as exc:
            # The framing cannot be trusted (or the payload is not worth draining): answer and close.
            self._send_error(conn, exc)
            self._linger(conn)
            return False
        grant_raw = tcp_wire.recv_exact(conn, grant_len)
        ops_raw = tcp_wire.recv_exact(conn, nops * OP_BYTES)
        try:
            checked = self._check(op, grant_raw, ops_raw, payload_len)
        except KVStoreError as exc:
            if op == tcp_wire.OP_WRITE:
                self._drain(conn, payload_len + nops * HASH_BYTES)  # payload and the hashes after it
            self._reject(conn, exc)
            return True
        if op == tcp_wire.OP_WRITE:
            return self._write(conn, checked, staging)
        return self._read(conn, checked)

    def _check(self, op: int, grant_raw: bytes, ops_raw: bytes, payload_len: int) -> _Checked:
        ops = np.frombuffer(ops_raw, dtype="<u8").reshape(-1, tcp_wire.OP_ROW)
        slots, offsets, lengths = ops[:, 0], ops[:, 1], ops[:, 2]
        if len(lengths) and int(lengths.max()) > self.max_request_bytes:
            raise KVStoreError(ErrorCode.TOO_LARGE, f"a range exceeds {self.max_request_bytes} bytes")
        total = int(lengths.sum())  # each length is bounded above, so the sum cannot wrap
        if total > self.max_request_bytes:
            raise KVStoreError(
                ErrorCode.TOO_LARGE, f"request of {total} bytes exceeds {self.max_request_bytes}"
            )
        if op == tcp_wire.OP_WRITE and total != payload_len:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"payload is {payload_len} bytes but the ranges add up to {total}"
            )
        secret = self._state.grant_secret
        if secret is None:
            raise KVStoreError(
                ErrorCode.BAD_GRANT, "this node has no grant key yet (not registered with a master)"
            )
        try:
            grant = pb.Grant.FromString(grant_raw)
        except DecodeError as exc:
            raise KVStoreError(ErrorCode.BAD_GRANT, "grant does not parse") from exc
        need = grants.WRITE if op == tcp_wire.OP_WRITE else grants.READ
        verified = grants.verify(
            secret,
            grant,
            self._state.node_id,
            self._state.incarnation,
            need,
            min_term=self._state.highest_term,
        )
        region, inventory = self._tier, self._inventory
        if grant.tier not in ("", region.tier):
            if grant.tier not in self._others:
                raise KVStoreError(ErrorCode.BAD_GRANT, f"this node has no {grant.tier!r} region")
            region, inventory = self._others[grant.tier]
        inventory.check_slots(slots, "data request")
        granted = verified.generation_of(slots)
        if np.any(region.generation(slots) != granted):
            raise KVStoreError(
                ErrorCode.BAD_GRANT,
                "slot generation differs from the grant's: the slot was freed or reassigned",
            )
        sizes = inventory.slot_bytes_of(slots)
        # offsets > sizes first: sizes - offsets would wrap for those rows
        if np.any((offsets > sizes) | (lengths > sizes - offsets)):
            raise KVStoreError(ErrorCode.BAD_RANGE, "a range runs past the end of its slot")
        return _Checked(
            slots=slots, starts=slots + offsets, lengths=lengths, granted=granted, total=total, region=region
        )

    def _ranges(self, checked: _Checked) -> np.ndarray:
        """(address, length) of each range in the mapped region, for the native socket calls."""
        table = np.empty((len(checked.starts), 2), dtype=np.uint64)
        table[:, 0] = checked.starts + np.uint64(checked.region.data_address)
        table[:, 1] = checked.lengths
        return table

    def _device_ranges(self, checked: _Checked) -> np.ndarray:
        """(start in the region, length) rows: what VramRegion.staged takes."""
        return np.stack((checked.starts, checked.lengths), axis=1).astype(np.uint64)

    def _write(self, conn: socket.socket, checked: _Checked, staging: np.ndarray) -> bool:
        if checked.region.tier == "vram":
            with checked.region.staged(self._device_ranges(checked), to_region=True) as (rows, lander):  # type: ignore[attr-defined]
                # Into pinned memory, hashed as it lands; it goes on to the GPU only if it checks out.
                landed = native.recv_ranges(conn, rows, with_hashes=True, staging=staging)
                expected = np.frombuffer(
                    tcp_wire.recv_exact(conn, len(checked.starts) * HASH_BYTES), dtype="<u8"
                )
                if landed is not None and np.array_equal(landed, expected):
                    lander.land()
            return self._answer_write(conn, checked, landed, expected)
        # Into the pool through the staging buffer (hashed there, then stream-copied: the pool's
        # cold lines are written without being read first); the client's hashes follow the payload.
        landed = native.recv_ranges(conn, self._ranges(checked), with_hashes=True, staging=staging)
        expected = np.frombuffer(tcp_wire.recv_exact(conn, len(checked.starts) * HASH_BYTES), dtype="<u8")
        return self._answer_write(conn, checked, landed, expected)

    def _answer_write(
        self, conn: socket.socket, checked: _Checked, landed: np.ndarray | None, expected: np.ndarray
    ) -> bool:
        # (the VRAM region counts its own bytes: GetStats reports them on its tier row)
        self.stats.add(written=0 if checked.region.tier == "vram" else checked.total)
        bad = np.flatnonzero(landed != expected)
        if len(bad):
            # The bytes stay where they landed: the slot is uncommitted and the writer redoes the range.
            self._send_error(
                conn,
                KVStoreError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"checksum mismatch on {len(bad)} of {len(expected)} ranges (first: range {int(bad[0])})",
                ),
            )
            return True
        if np.any(checked.region.generation(checked.slots) != checked.granted):
            self._send_error(conn, KVStoreError(ErrorCode.BAD_GRANT, "a slot was freed during the write"))
            return True
        conn.sendall(tcp_wire.encode_response_head(0))
        return True

    def _read(self, conn: socket.socket, checked: _Checked) -> bool:
        if checked.region.tier == "vram":
            with checked.region.staged(self._device_ranges(checked), to_region=False) as (rows, _):  # type: ignore[attr-defined]
                # The bytes were copied out (completed) before this check: unchanged means they are the slot's.
                unchanged = bool(np.all(checked.region.generation(checked.slots) == checked.granted))
                conn.sendall(tcp_wire.encode_response_head(0, "", checked.total))
                hashes = native.send_ranges(conn, rows, with_hashes=True)
            assert hashes is not None
            self.stats.add()
            conn.sendall(hashes.astype("<u8").tobytes() + (b"\x01" if unchanged else b"\x00"))
            return True
        # Straight from the pool, hashed as it goes out; hashes and the generation trailer follow.
        conn.sendall(tcp_wire.encode_response_head(0, "", checked.total))
        hashes = native.send_ranges(conn, self._ranges(checked), with_hashes=True)
        assert hashes is not None
        unchanged = bool(np.all(checked.region.generation(checked.slots) == checked.granted))
        self.stats.add(read=checked.total)
        conn.sendall(hashes.astype("<u8").tobytes() + (b"\x01" if unchanged else b"\x00"))
        return True

    # -- errors
    def _reject(self, conn: socket.socket, exc: KVStoreError) -> None:
        rejected = exc.code is ErrorCode.BAD_GRANT
        self.stats.add(rejected=int(rejected))
        if rejected:
            log.debug("data request rejected: %s", exc.message)
        self._send_error(conn, exc)

    @staticmethod
    def _send_error(conn: socket.socket, exc: KVStoreError) -> None:
        conn.sendall(tcp_wire.encode_response_head(1, tcp_wire.error_message(exc)))

    @staticmethod
    def _linger(conn: socket.socket) -> None:
        """Half-close, then discard what the client still sends for a moment before the socket closes.

        Closing with unread bytes makes the kernel send a reset, which can destroy the error
        answer before the client reads it; a client still pushing a payload gets a moment to
        stop and read why.
        """
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(LINGER_S)
            scratch = bytearray(DRAIN_CHUNK)
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline and conn.recv_into(scratch):
                pass

    @staticmethod
    def _drain(conn: socket.socket, nbytes: int) -> None:
        scratch = memoryview(bytearray(min(nbytes, DRAIN_CHUNK)))
        left = nbytes
        while left:
            got = conn.recv_into(scratch, min(left, len(scratch)))
            if got == 0:
                raise ConnectionError(f"peer closed the connection with {left} payload bytes unsent")
            left -= got
