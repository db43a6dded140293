"""What the client hands back: prefix hits and read leases."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvstore._proto import kvstore_pb2 as pb


@dataclass(frozen=True, eq=False)  # compare the data yourself: it is an array
class PrefixHit:
    """The leading pages of a sequence that were found and read.

    ``data`` is ``[len(layers), num_pages, shard_bytes]`` uint8: a view of the
    caller's ``out`` (its first ``num_pages`` pages) or of a fresh array.
    """

    num_pages: int
    num_tokens: int
    layers: list[int]
    heads: tuple[int, int]
    data: np.ndarray
    _layer_index: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._layer_index.update({layer: i for i, layer in enumerate(self.layers)})

    def layer(self, layer: int) -> np.ndarray:
        """``[num_pages, shard_bytes]`` of namespace layer ``layer`` (as numbered in the namespace)."""
        try:
            return self.data[self._layer_index[layer]]
        except KeyError:
            raise KeyError(f"layer {layer} was not read (read: {self.layers})") from None

    def __bool__(self) -> bool:
        return self.num_pages > 0


@dataclass(frozen=True, eq=False)  # compare the data yourself: it is an array
class LayerReady:
    """One layer of a streamed prefix, read into the caller's ``out`` (:meth:`KVStoreClient.get_prefix_stream`).

    ``data`` is ``[num_pages, shard_bytes]`` uint8, a view of ``out[index, :num_pages]``.
    """

    layer: int  # as numbered in the namespace
    index: int  # position in the stream's ``layers`` (and in ``out``)
    num_pages: int  # leading pages read for this layer
    data: np.ndarray


@dataclass(frozen=True)
class Lease:
    """A read lease on matched pages: usable from any process by ``lease_id`` until released or expired."""

    lease_id: str
    num_pages: int
    num_tokens: int
    expires_unix_ms: int
    # The master's answer, so that get_prefix in this process needs no DescribeLease.
    _response: pb.AcquirePrefixResponse | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return self.lease_id

    def __reduce__(self) -> tuple[type[Lease], tuple[str, int, int, int]]:
        # Another process gets the id and counts only; it asks the master (DescribeLease), which also
        # tells it whether the lease is still alive.
        return Lease, (self.lease_id, self.num_pages, self.num_tokens, self.expires_unix_ms)
