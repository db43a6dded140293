"""The metadata backend: durable control state behind one interface.

Two implementations: :mod:`kvstore.metadata.embedded` (in-process, a single
machine) and etcd (a cluster; issue 3).  What lives here: namespaces, cluster
config, the grant secret, node registrations under a TTL and leader election
with a term.  The object index never does: it lives in the leader's memory.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class Leadership:
    """This process leads the cluster under ``term`` (terms only grow)."""

    term: int
    leader_address: str


class MetadataBackend(abc.ABC):
    """Every operation is async and raises KVStoreError(UNAVAILABLE) when the store is unreachable."""

    # -- namespaces (values are serialized kvstore.v1.NamespaceSpec)
    @abc.abstractmethod
    async def get_namespace(self, name: str) -> bytes | None: ...

    @abc.abstractmethod
    async def put_namespace_if_absent(self, name: str, spec: bytes) -> bytes | None:
        """Store ``spec`` unless ``name`` exists; return the existing value, or None if stored."""

    @abc.abstractmethod
    async def delete_namespace(self, name: str) -> bool: ...

    @abc.abstractmethod
    async def list_namespaces(self) -> dict[str, bytes]: ...

    # -- cluster-wide values (grant secret, config)
    @abc.abstractmethod
    async def get_or_create(self, key: str, value: bytes) -> bytes:
        """Atomically store ``value`` under ``key`` unless present; return what is stored."""

    # -- leadership
    @abc.abstractmethod
    async def campaign(self, address: str) -> Leadership:
        """Wait until this process leads; return its term."""

    @abc.abstractmethod
    async def still_leader(self, leadership: Leadership) -> bool: ...

    @abc.abstractmethod
    async def close(self) -> None: ...
