"""Metadata backends and their factory."""

from __future__ import annotations

from kvstore.metadata.base import (
    NODE_DELETE,
    NODE_PUT,
    NODE_RESYNC,
    Leadership,
    MetadataBackend,
    NodeEvent,
    NodeRegistration,
)


def create_backend(
    etcd_endpoints: str = "",
    cluster: str = "default",
    *,
    timeout_s: float | None = None,
    leader_ttl_s: int | None = None,
) -> MetadataBackend:
    """The embedded backend without endpoints; etcd (``HOST:PORT[,HOST:PORT...]``) with them.

    ``cluster`` names the key prefix in etcd (``/kvstore/<cluster>/``).  ``timeout_s``
    (every etcd call) and ``leader_ttl_s`` (the leader's lease) default to
    :data:`kvstore.metadata.etcd.DEFAULT_TIMEOUT_S` / ``DEFAULT_LEADER_TTL_S``.
    """
    if etcd_endpoints.strip():
        # Imported here so that the embedded path never loads the etcd client library.
        from kvstore.metadata import etcd

        return etcd.EtcdBackend(
            etcd_endpoints,
            cluster=cluster,
            timeout_s=etcd.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
            leader_ttl_s=etcd.DEFAULT_LEADER_TTL_S if leader_ttl_s is None else leader_ttl_s,
        )
    from kvstore.metadata.embedded import EmbeddedBackend

    return EmbeddedBackend()


__all__ = [
    "NODE_DELETE",
    "NODE_PUT",
    "NODE_RESYNC",
    "Leadership",
    "MetadataBackend",
    "NodeEvent",
    "NodeRegistration",
    "create_backend",
]
