"""The client SDK: :class:`KVStoreClient` (sync) and :class:`AsyncKVStoreClient`."""

from kvstore.client.aio import AsyncKVStoreClient
from kvstore.client.client import KVStoreClient
from kvstore.client.types import Lease, PrefixHit

__all__ = ["AsyncKVStoreClient", "KVStoreClient", "Lease", "PrefixHit"]
