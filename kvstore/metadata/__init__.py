"""Metadata backends and their factory."""

from __future__ import annotations

from kvstore.metadata.base import Leadership, MetadataBackend


def create_backend(etcd_endpoints: str = "") -> MetadataBackend:
    """The embedded backend without endpoints; etcd with them."""
    if etcd_endpoints:
        from kvstore.errors import ErrorCode, KVStoreError

        raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "the etcd backend is not built yet (issue 3); omit --etcd")
    from kvstore.metadata.embedded import EmbeddedBackend

    return EmbeddedBackend()


__all__ = ["Leadership", "MetadataBackend", "create_backend"]
