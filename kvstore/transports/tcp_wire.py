"""Wire format of the TCP data plane (client <-> node data server).

One request moves many ranges of one node: all pages of one layer (or of a
whole read) in one frame, never a frame per segment.  Connections are reused;
requests on one connection are sequential.

Request::

    header   <4sBBHIQQ>  magic b"KVT2", op (WRITE=1, READ=2), flags, 0, grant_len, nops, payload_len
    grant    grant_len bytes: a serialized kvstore.v1.Grant
    ops      nops * <QQQ>  (slot offset, offset within the slot, length)
    payload  WRITE only: the ranges' bytes, back to back, in op order
    hashes   WRITE only: nops * <Q> xxh3_64 of each range as the client sent it

Response::

    header   <4sBBHIQ>   magic b"KVR2", status (0 ok, 1 error), 0, 0, message_len, payload_len
    message  message_len bytes of UTF-8: "<ERRORCODE>: text" when status is 1
    payload  READ only: the ranges' bytes, back to back, in op order
    hashes   READ only: nops * <Q> xxh3_64 of each range as the node sent it
    trailer  READ only: <B> 1 if every slot's generation was unchanged after the send, else 0

Hashes follow the payload so that each side hashes the bytes in the same pass
that sends or receives them (kvstore.native.send_ranges / recv_ranges), while
they are in cache, instead of walking the whole payload once more before the
first byte goes out or after the last one lands.

A WRITE is checked against the grant (signature, expiry, rights, slots and
their generations) before a byte is received into the pool, and the landed
bytes are hashed and compared with the client's hashes.  A READ whose trailer
is 0 is a miss: the slot was freed or reused during the copy.
"""

from __future__ import annotations

import socket
import struct

import numpy as np

from kvstore.errors import ErrorCode, KVStoreError

REQ_MAGIC = b"KVT2"
RESP_MAGIC = b"KVR2"
OP_WRITE = 1
OP_READ = 2
REQUEST_HEADER = struct.Struct("<4sBBHIQQ")
RESPONSE_HEADER = struct.Struct("<4sBBHIQ")
OP_ROW = 3  # u64 words per op
MAX_GRANT_BYTES = 4 << 20
MAX_OPS = 1 << 22


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; ConnectionError if the peer goes away first."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {total} bytes")
        got += n


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def encode_request_head(op: int, grant: bytes, ops: np.ndarray, payload_len: int) -> bytes:
    table = np.ascontiguousarray(ops, dtype="<u8")
    return (
        REQUEST_HEADER.pack(REQ_MAGIC, op, 0, 0, len(grant), len(table), payload_len)
        + grant
        + table.tobytes()
    )


def decode_request_header(raw: bytes) -> tuple[int, int, int, int]:
    """-> (op, grant_len, nops, payload_len); raises INVALID_ARGUMENT on garbage."""
    magic, op, _flags, _zero, grant_len, nops, payload_len = REQUEST_HEADER.unpack(raw)
    if magic != REQ_MAGIC or op not in (OP_WRITE, OP_READ):
        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "not a kvstore data-plane request")
    if grant_len > MAX_GRANT_BYTES or nops > MAX_OPS:
        raise KVStoreError(ErrorCode.TOO_LARGE, f"request with {nops} ranges and a {grant_len}-byte grant")
    return op, grant_len, nops, payload_len


def encode_response_head(status: int, message: str = "", payload_len: int = 0) -> bytes:
    msg = message.encode()
    return RESPONSE_HEADER.pack(RESP_MAGIC, status, 0, 0, len(msg), payload_len) + msg


def read_response_head(sock: socket.socket) -> int:
    """Read a response header and message; raise the node's error, or return the payload length."""
    magic, status, _a, _b, msg_len, payload_len = RESPONSE_HEADER.unpack(
        recv_exact(sock, RESPONSE_HEADER.size)
    )
    if magic != RESP_MAGIC:
        raise KVStoreError(ErrorCode.UNAVAILABLE, "data server answered with garbage")
    message = recv_exact(sock, msg_len).decode(errors="replace") if msg_len else ""
    if status != 0:
        code_name, _, text = message.partition(": ")
        code = ErrorCode[code_name] if code_name in ErrorCode.__members__ else ErrorCode.INTERNAL
        raise KVStoreError(code, text or message)
    return payload_len


def error_message(exc: KVStoreError) -> str:
    return f"{exc.code.name}: {exc.message}"
