"""The metadata backend: durable control state behind one interface.

Two implementations: :mod:`kvstore.metadata.embedded` (in-process, a single
machine) and :mod:`kvstore.metadata.etcd` (a cluster).  What lives here:
namespaces, cluster config, cluster-wide values (the grant secret), node
registrations under a TTL, and leader election with a term.  The object index
never does: it lives in the leader's memory (docs/control-plane.md).

Conventions shared by both implementations:

- Every call is async, bounded by a timeout, and raises
  ``KVStoreError(UNAVAILABLE)`` when the store cannot be reached.
- Leadership is a lease: :meth:`MetadataBackend.campaign` returns a
  :class:`Leadership` that stays valid while the backend keeps its lease alive.
  :meth:`MetadataBackend.leading` answers locally (no I/O) and turns False the
  moment the lease can no longer be proven alive, so a leader that was paused
  (GC, SIGSTOP, partition) stops acting before a successor can start.
  :meth:`MetadataBackend.put_if_leader` is the fenced write: it fails with
  ``NOT_LEADER`` unless the leadership is still the current one in the store.
- Node registrations are explicit: the registrant calls
  :meth:`MetadataBackend.keepalive_node` on its heartbeat; a registrant that
  stops doing so disappears after its TTL.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Leadership:
    """This process leads the cluster under ``term`` (terms only grow, one leader per term).

    ``token`` identifies this leadership in the store (etcd: the create revision
    of the leader key); fenced writes compare it, so equal terms from a
    confused store could never pass for each other.
    """

    term: int
    leader_address: str
    token: int = 0


@dataclass(frozen=True)
class NodeRegistration:
    """Handle of one node registration (what keepalive/update/unregister take)."""

    node_id: str
    lease_id: int
    ttl_s: float


class NodeEvent(NamedTuple):
    """One change of the node registrations, as ``(kind, node_id, info)``.

    ``kind`` is :data:`NODE_PUT` (registered or info changed), :data:`NODE_DELETE`
    (unregistered or TTL expired; ``info`` empty) or :data:`NODE_RESYNC` (the
    watch lost history, e.g. etcd compacted it; ``node_id`` and ``info`` empty).
    A resync is followed by the puts and deletes that bring a consumer who
    applied every earlier event to the current state, so applying events in
    order is always enough; the marker only says that intermediate states
    were skipped.
    """

    kind: str
    node_id: str
    info: bytes


NODE_PUT = "put"
NODE_DELETE = "delete"
NODE_RESYNC = "resync"


class MetadataBackend(abc.ABC):
    """Every operation is async and raises KVStoreError(UNAVAILABLE) when the store is unreachable.

    One instance serves one event loop (its connections belong to it) and holds at
    most one candidacy/leadership at a time.
    """

    # -- namespaces (values are serialized kvstore.v1.NamespaceSpec)
    @abc.abstractmethod
    async def get_namespace(self, name: str) -> bytes | None: ...

    @abc.abstractmethod
    async def put_namespace_if_absent(
        self, name: str, spec: bytes, leadership: Leadership | None = None
    ) -> bytes | None:
        """Store ``spec`` unless ``name`` exists; return the existing value, or None if stored.

        With ``leadership`` the write is fenced (NOT_LEADER if it is no longer current).
        """

    @abc.abstractmethod
    async def delete_namespace(self, name: str, leadership: Leadership | None = None) -> bool:
        """Delete ``name``; False if it did not exist.  Fenced like :meth:`put_namespace_if_absent`."""

    @abc.abstractmethod
    async def list_namespaces(self) -> dict[str, bytes]: ...

    # -- cluster-wide values (grant secret, ...)
    @abc.abstractmethod
    async def get_or_create(self, key: str, value: bytes) -> bytes:
        """Atomically store ``value`` under ``key`` unless present; return what is stored."""

    @abc.abstractmethod
    async def get_value(self, key: str) -> bytes | None:
        """The value under ``key`` (written by get_or_create or put_if_leader), or None."""

    @abc.abstractmethod
    async def put_if_leader(self, key: str, value: bytes, leadership: Leadership) -> None:
        """Store ``value`` under ``key`` only while ``leadership`` is current; NOT_LEADER otherwise."""

    # -- cluster config (one TOML/JSON blob: watermarks, lease times, ...)
    @abc.abstractmethod
    async def get_cluster_config(self) -> bytes | None: ...

    @abc.abstractmethod
    async def put_cluster_config(self, blob: bytes, leadership: Leadership | None = None) -> None:
        """Replace the cluster config; fenced when ``leadership`` is given."""

    # -- node registrations (a node that stops keeping its registration alive disappears)
    @abc.abstractmethod
    async def register_node(self, node_id: str, info: bytes, ttl_s: float) -> NodeRegistration:
        """Register (or re-register) ``node_id`` with ``info`` for ``ttl_s`` seconds from now.

        A re-registration replaces the previous one (and its TTL) for that id.
        """

    @abc.abstractmethod
    async def keepalive_node(self, registration: NodeRegistration) -> bool:
        """Restart the registration's TTL; False if it already expired (register again)."""

    @abc.abstractmethod
    async def update_node(self, registration: NodeRegistration, info: bytes) -> bool:
        """Replace the registration's info, keeping its TTL; False if it already expired."""

    @abc.abstractmethod
    async def unregister_node(self, registration: NodeRegistration) -> None:
        """Remove the registration now (a clean shutdown); no error if it already expired."""

    @abc.abstractmethod
    async def list_nodes(self) -> dict[str, bytes]:
        """node_id -> info of every live registration."""

    @abc.abstractmethod
    def watch_nodes(self, include_existing: bool = True) -> AsyncGenerator[NodeEvent, None]:
        """Registration changes as :class:`NodeEvent` s, for as long as the caller iterates.

        The watch starts when first pulled; with ``include_existing`` it first yields
        a put for every node live at that moment, and then every change after it,
        with no gap.  It survives store restarts and compaction on its own (see NodeEvent);
        cancel the consuming task or close the iterator (``aclose()``) to stop it.
        """

    # -- leadership
    @abc.abstractmethod
    async def campaign(self, address: str) -> Leadership:
        """Wait (as long as it takes, riding out store outages) until this process leads; return its term.

        While waiting, ``address`` is listed by :meth:`list_masters` as a standby.
        """

    @abc.abstractmethod
    def leading(self, leadership: Leadership) -> bool:
        """Local check, no I/O: False once this process knows or cannot rule out that it lost ``leadership``."""

    @abc.abstractmethod
    async def still_leader(self, leadership: Leadership) -> bool:
        """:meth:`leading`, confirmed against the store when it is reachable."""

    @abc.abstractmethod
    async def wait_lost(self, leadership: Leadership) -> str:
        """Return (with the reason) once ``leadership`` is lost; a leader runs this in a task and steps down."""

    @abc.abstractmethod
    async def resign(self) -> None:
        """Give up the leadership (or candidacy) this backend holds, so a standby takes over now.

        Cancel a campaign() still pending in another task first, or it goes on campaigning.
        """

    @abc.abstractmethod
    async def leader(self) -> str | None:
        """Address of the current leader, or None while there is none."""

    @abc.abstractmethod
    async def current_leadership(self) -> Leadership | None:
        """The current leader's Leadership as the store records it (address, term, token), or None."""

    @abc.abstractmethod
    async def list_masters(self) -> list[str]:
        """Addresses of every master that leads or campaigns (standbys), sorted."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release local resources.  Held leases are not revoked: they lapse after their TTL,
        as after a crash; call resign()/unregister_node() first for a prompt hand-over."""
