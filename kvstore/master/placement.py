"""Placement strategies (DESIGN.md, "Placement strategy").

A strategy orders the candidate nodes for the pages of one request; the master
fills them in that order, page by page, so a request can spill from the
preferred node onto others.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeCandidate:
    """What a strategy may look at: a live node able to take pages."""

    index: int
    node_id: str
    host_id: str
    free_bytes: int
    capacity_bytes: int


class PlacementStrategy(abc.ABC):
    @abc.abstractmethod
    def order(self, nodes: Sequence[NodeCandidate], writer_host: str, reader_host: str) -> list[int]:
        """Node indices in the order they should be filled (best first)."""


class HostThenMostFree(PlacementStrategy):
    """The node on the future reader's host if named, else on the writer's host; then the most free bytes.

    Same-host placement lets the reader (or writer) copy one-sided through the
    pool file instead of going over TCP.
    """

    def order(self, nodes: Sequence[NodeCandidate], writer_host: str, reader_host: str) -> list[int]:
        preferred = reader_host or writer_host
        ranked = sorted(
            nodes,
            key=lambda n: (not (preferred and n.host_id == preferred), -n.free_bytes, n.node_id),
        )
        return [n.index for n in ranked]
