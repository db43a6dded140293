"""Cross-host transport: framed requests to the node's TCP data server (see tcp_wire.py).

A batch (all pages and layers of one node) goes as one request, or a few when
it is larger than :data:`MAX_REQUEST_BYTES`.  Payload bytes are sent from the
caller's buffer directly, and received into it through a small per-thread
staging buffer, by one native call per request (GIL released), which hashes
every range in the same pass: for a write the hashes are both what the node
checks and the run hashes of the commit checksums; for a read they check what
landed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

import numpy as np

from kvstore import native
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.transports import tcp_wire
from kvstore.transports.base import CopyPlan, NodeBatch, Transport, check_batch

log = logging.getLogger("kvstore.transports.tcp")

MAX_REQUEST_BYTES = 256 << 20  # payload per request: bounds node-side buffering and the cost of a retry
MAX_IDLE_PER_ADDRESS = 8


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, f"data address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class ConnectionPool:
    """Idle connections per data address.  A connection that saw any error is closed, never reused."""

    def __init__(self, timeout_s: float, max_idle: int = MAX_IDLE_PER_ADDRESS) -> None:
        self._timeout_s = timeout_s
        self._max_idle = max_idle
        self._idle: dict[str, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self, address: str) -> socket.socket:
        try:
            sock = socket.create_connection(split_address(address), timeout=self._timeout_s)
        except TimeoutError as exc:
            raise KVStoreError(ErrorCode.DEADLINE, f"data server {address}: connect timed out") from exc
        except OSError as exc:
            raise KVStoreError(ErrorCode.UNAVAILABLE, f"data server {address}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Socket buffers are left to the kernel's autotuning: fixing them slows a stream down.
        return sock

    @contextlib.contextmanager
    def connection(self, address: str) -> Iterator[socket.socket]:
        with self._lock:
            idle = self._idle.get(address)
            sock = idle.pop() if idle else None
        if sock is None:
            sock = self._connect(address)
        try:
            yield sock
        except BaseException:
            sock.close()
            raise
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if self._closed or len(idle) >= self._max_idle:
                sock.close()
            else:
                idle.append(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for sock in socks:
            sock.close()


def _chunks(lengths: np.ndarray, limit: int = MAX_REQUEST_BYTES) -> list[tuple[int, int]]:
    """Split ops into consecutive [lo, hi) groups of at most ``limit`` payload bytes (at least one op each)."""
    ends = np.cumsum(lengths.astype(np.int64))
    bounds = [0]
    while bounds[-1] < len(lengths):
        lo = bounds[-1]
        base = int(ends[lo - 1]) if lo else 0
        hi = int(np.searchsorted(ends, base + limit, side="right"))
        bounds.append(max(hi, lo + 1))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _ranges(base: int, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(address, length) rows for the native socket and hash calls."""
    return np.stack((np.uint64(base) + offsets.astype(np.uint64), lengths.astype(np.uint64)), axis=1)


def _io_error(address: str, exc: OSError) -> KVStoreError:
    if isinstance(exc, TimeoutError):
        return KVStoreError(ErrorCode.DEADLINE, f"data server {address}: timed out")
    return KVStoreError(ErrorCode.UNAVAILABLE, f"data server {address}: {exc}")


class TcpTransport(Transport):
    """Talks to every node's data server; stateless apart from its connection pool."""

    name = "tcp"

    def __init__(self, connections: ConnectionPool, hash_threads: int = 1) -> None:
        self._connections = connections
        self._threads = max(1, hash_threads)
        self._local = threading.local()  # .staging: each reading thread's buffer for recv_ranges

    def _staging(self) -> np.ndarray:
        staging: np.ndarray | None = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = native.staging_buffer()
        return staging

    def close(self) -> None:
        self._connections.close()

    def write(self, batch: NodeBatch, plan: CopyPlan) -> np.ndarray:
        if plan.device is not None:  # GPU memory: staged through a pinned host buffer
            from kvstore.gpu import transfer

            return transfer.staged_write(self, batch, plan)
        check_batch(batch, plan.layout)
        ops, buf_offsets = plan.slot_ops(batch)
        lengths = ops[:, 2]
        ranges = _ranges(plan.address, buf_offsets, lengths)
        hashes = np.empty(len(ops), dtype=np.uint64)
        grant = batch.grant.SerializeToString()
        address = batch.node.data_address
        for lo, hi in _chunks(lengths):
            head = tcp_wire.encode_request_head(
                tcp_wire.OP_WRITE, grant, ops[lo:hi], int(lengths[lo:hi].sum())
            )
            with self._connections.connection(address) as sock:
                try:
                    self._send(sock, head, ranges[lo:hi], hashes[lo:hi])
                    tcp_wire.read_response_head(sock)
                except OSError as exc:
                    raise _io_error(address, exc) from exc
        return hashes.reshape(len(plan.layers), len(batch), plan.runs_per_shard)

    @staticmethod
    def _send(sock: socket.socket, head: bytes, ranges: np.ndarray, hashes: np.ndarray) -> None:
        """Head, payload straight from the caller's buffer (hashed as it goes out), then the hashes."""
        try:
            sock.sendall(head)
            sent = native.send_ranges(sock, ranges, with_hashes=True)
            assert sent is not None
            hashes[:] = sent
            sock.sendall(sent.astype("<u8").tobytes())
        except OSError as exc:
            # The node may have refused the request and hung up before taking the payload:
            # its answer says why, which beats "broken pipe".
            try:
                tcp_wire.read_response_head(sock)
            except (OSError, KVStoreError) as answer:
                if isinstance(answer, KVStoreError) and answer.code is not ErrorCode.UNAVAILABLE:
                    raise answer from exc
            raise

    def read(self, batch: NodeBatch, plan: CopyPlan) -> int:
        if plan.device is not None:
            from kvstore.gpu import transfer

            return transfer.staged_read(self, batch, plan)
        check_batch(batch, plan.layout)
        ops, buf_offsets = plan.slot_ops(batch)
        lengths = ops[:, 2]
        ranges = _ranges(plan.address, buf_offsets, lengths)
        op_pages = plan.op_pages(batch)
        grant = batch.grant.SerializeToString()
        address = batch.node.data_address
        intact = len(batch)
        for lo, hi in _chunks(lengths):
            try:
                bad = self._read_request(address, grant, ops[lo:hi], ranges[lo:hi])
            except (KVStoreError, OSError) as exc:
                # The node is gone or refused (grant expired, slot reassigned): its pages are misses.
                log.info(
                    "read from node %s failed, counting its pages as misses: %s", batch.node.node_id, exc
                )
                return min(intact, int(op_pages[lo:].min()))
            if bad.any():
                intact = min(intact, int(op_pages[lo:hi][bad].min()))
        return intact

    def _read_request(self, address: str, grant: bytes, ops: np.ndarray, ranges: np.ndarray) -> np.ndarray:
        """One READ request; returns a mask of its ops whose bytes cannot be trusted.

        The payload lands in the caller's buffer through a staging buffer, hashed on the way.
        """
        expected = int(ops[:, 2].sum())
        with self._connections.connection(address) as sock:
            try:
                sock.sendall(tcp_wire.encode_request_head(tcp_wire.OP_READ, grant, ops, 0))
                payload_len = tcp_wire.read_response_head(sock)
                if payload_len != expected:
                    raise KVStoreError(
                        ErrorCode.UNAVAILABLE,
                        f"data server {address} announced {payload_len} bytes, {expected} asked for",
                    )
                landed = native.recv_ranges(sock, ranges, with_hashes=True, staging=self._staging())
                tail = tcp_wire.recv_exact(sock, 8 * len(ops) + 1)
            except OSError as exc:
                raise _io_error(address, exc) from exc
        assert landed is not None
        node_hashes = np.frombuffer(tail, dtype="<u8", count=len(ops))
        if tail[-1:] != b"\x01":
            # A slot was freed or reused while the node sent it: the whole request is suspect.
            return np.ones(len(ops), dtype=bool)
        bad = landed != node_hashes
        if bad.any():
            log.warning(
                "data from %s failed its checksum in %d of %d ranges", address, int(bad.sum()), len(ops)
            )
        return bad
