"""kvstore: a distributed KV-cache store for LLM inference (see DESIGN.md).

The public names are loaded on first use, so that ``import kvstore.config``
(services, the CLI) does not pull in the client and its gRPC machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvstore.client import AsyncKVStoreClient, KVStoreClient, Lease, PrefixHit
    from kvstore.errors import ErrorCode, KVStoreError
    from kvstore.keys import TokenSequence

__version__ = "0.1.0"

_EXPORTS = {
    "KVStoreClient": "kvstore.client",
    "AsyncKVStoreClient": "kvstore.client",
    "PrefixHit": "kvstore.client",
    "Lease": "kvstore.client",
    "KVStoreError": "kvstore.errors",
    "ErrorCode": "kvstore.errors",
    "TokenSequence": "kvstore.keys",
}

__all__ = [
    "AsyncKVStoreClient",
    "ErrorCode",
    "KVStoreClient",
    "KVStoreError",
    "Lease",
    "PrefixHit",
    "TokenSequence",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
