"""Grants: the master's signature on a placement (DESIGN.md, "Grants").

A grant names a node incarnation, a list of slots with their generations, an
expiry, the leader term and the rights (read/write).  The MAC is HMAC-SHA256
with a key shared by the master and its nodes.  Every node-side data server
checks it, which fences stale leaders (term), late writers (expiry, generation)
and forged requests (MAC).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from dataclasses import dataclass

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import ErrorCode, KVStoreError

READ = 1
WRITE = 2
_HEADER = struct.Struct("<16sQQI")


def _message(
    node_id: str,
    incarnation: bytes,
    slots: bytes,
    generations: bytes,
    expires_ms: int,
    term: int,
    rights: int,
    tier: str = "",
) -> bytes:
    nid = node_id.encode()
    # vram: a grant for another region of the node names it; DRAM grants keep the v1 bytes
    region = b"" if tier in ("", "dram") else b"tier\0" + tier.encode()
    return b"".join(
        (
            b"kvstore-grant/v1\0",
            struct.pack("<I", len(nid)),
            nid,
            _HEADER.pack(incarnation, expires_ms, term, rights),
            struct.pack("<I", len(slots)),
            slots,
            generations,
            region,
        )
    )


def sign(
    secret: bytes,
    node_id: str,
    incarnation: bytes,
    slots: np.ndarray,
    generations: np.ndarray,
    expires_ms: int,
    term: int,
    rights: int,
    tier: str = "",
) -> pb.Grant:
    slot_bytes = np.ascontiguousarray(slots, dtype="<u8").tobytes()
    gen_bytes = np.ascontiguousarray(generations, dtype="<u4").tobytes()
    mac = hmac.new(
        secret,
        _message(node_id, incarnation, slot_bytes, gen_bytes, expires_ms, term, rights, tier),
        hashlib.sha256,
    ).digest()
    return pb.Grant(
        node_id=node_id,
        incarnation=incarnation,
        slots=slot_bytes,
        generations=gen_bytes,
        expires_unix_ms=expires_ms,
        term=term,
        rights=rights,
        mac=mac,
        tier="" if tier == "dram" else tier,
    )


@dataclass(frozen=True)
class VerifiedGrant:
    """A grant whose MAC, node, expiry and rights checked out."""

    slots: np.ndarray  # u64 slot offsets, sorted as given
    generations: np.ndarray  # u32
    expires_ms: int
    term: int
    rights: int

    def generation_of(self, slot_offsets: np.ndarray) -> np.ndarray:
        """Generation the grant names for each slot; raises if a slot is not covered."""
        order = np.argsort(self.slots, kind="stable")
        sorted_slots = self.slots[order]
        pos = np.searchsorted(sorted_slots, slot_offsets)
        pos_clipped = np.minimum(pos, len(sorted_slots) - 1)
        if len(sorted_slots) == 0 or not np.all(sorted_slots[pos_clipped] == slot_offsets):
            raise KVStoreError(ErrorCode.BAD_GRANT, "request touches a slot the grant does not cover")
        return self.generations[order[pos_clipped]]


def verify(
    secret: bytes,
    grant: pb.Grant,
    node_id: str,
    incarnation: bytes,
    need: int,
    min_term: int = 0,
    now_ms: int | None = None,
) -> VerifiedGrant:
    """Check a grant presented to this node; raise BAD_GRANT (UNAUTHENTICATED) otherwise."""
    expected = hmac.new(
        secret,
        _message(
            grant.node_id,
            grant.incarnation,
            grant.slots,
            grant.generations,
            grant.expires_unix_ms,
            grant.term,
            grant.rights,
            grant.tier,
        ),
        hashlib.sha256,
    ).digest()
    if not hmac.compare_digest(expected, grant.mac):
        raise KVStoreError(ErrorCode.BAD_GRANT, "grant signature does not verify")
    if grant.node_id != node_id or grant.incarnation != incarnation:
        raise KVStoreError(ErrorCode.BAD_GRANT, "grant was issued for another node or an earlier incarnation")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if grant.expires_unix_ms < now:
        raise KVStoreError(ErrorCode.BAD_GRANT, f"grant expired {now - grant.expires_unix_ms} ms ago")
    if grant.rights & need != need:
        raise KVStoreError(ErrorCode.BAD_GRANT, "grant does not carry the rights this request needs")
    if grant.term < min_term:
        raise KVStoreError(
            ErrorCode.BAD_GRANT, f"grant from leader term {grant.term}, current term is {min_term}"
        )
    if len(grant.slots) % 8 or len(grant.generations) * 2 != len(grant.slots):
        raise KVStoreError(ErrorCode.BAD_GRANT, "grant slot table is malformed")
    return VerifiedGrant(
        slots=np.frombuffer(grant.slots, dtype="<u8"),
        generations=np.frombuffer(grant.generations, dtype="<u4"),
        expires_ms=grant.expires_unix_ms,
        term=grant.term,
        rights=grant.rights,
    )
