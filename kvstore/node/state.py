"""State the node's gRPC service, its data server and its master link share."""

from __future__ import annotations

import threading

from kvstore.errors import ErrorCode, KVStoreError


class NodeState:
    """Identity, grant key and the highest leader term this node has seen.

    Written on the event loop, read by data-server threads: every field is
    replaced whole (never mutated in place), so a reader sees an old or a new
    value, never a torn one.
    """

    def __init__(self, node_id: str, incarnation: bytes, grant_secret: bytes | None = None) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.grant_secret: bytes | None = grant_secret
        self.highest_term = 0
        self._term_lock = threading.Lock()

    def observe_term(self, term: int) -> None:
        """Remember ``term``; raise NOT_LEADER if a higher term was seen already."""
        with self._term_lock:
            if term < self.highest_term:
                raise KVStoreError(
                    ErrorCode.NOT_LEADER,
                    f"update from leader term {term}, but this node has seen term {self.highest_term}",
                )
            self.highest_term = term

    def raise_term(self, term: int) -> None:
        """Move the term forward (never back), e.g. from a heartbeat answer."""
        with self._term_lock:
            if term > self.highest_term:
                self.highest_term = term
