"""create_backend with etcd endpoints, endpoint parsing, cluster prefixes, unreachable etcd (no server needed)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.metadata import create_backend
from kvstore.metadata.etcd import EtcdBackend, cluster_prefix, parse_endpoints


def test_parse_endpoints() -> None:
    assert parse_endpoints("127.0.0.1:2379") == [("127.0.0.1", 2379)]
    assert parse_endpoints(" a:1, http://b:2/ ,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]
    for bad in ("", "host", "host:port", "host:0", ":2379", "a:1,b"):
        with pytest.raises(KVStoreError) as err:
            parse_endpoints(bad)
        assert err.value.code == ErrorCode.INVALID_ARGUMENT


def test_cluster_prefix() -> None:
    assert cluster_prefix("default") == b"/kvstore/default/"
    assert cluster_prefix("prod-eu", root="/x/") == b"/x/prod-eu/"
    for bad in ("", "a/b", " a", "a\n"):
        with pytest.raises(KVStoreError):
            cluster_prefix(bad)


def test_factory_with_endpoints_builds_the_etcd_backend() -> None:
    backend = create_backend("127.0.0.1:2379", cluster="c1", timeout_s=0.5, leader_ttl_s=2)
    assert isinstance(backend, EtcdBackend)
    assert backend.prefix == b"/kvstore/c1/"
    assert backend.endpoint == "127.0.0.1:2379"
    with pytest.raises(KVStoreError):
        create_backend("127.0.0.1:2379", leader_ttl_s=0)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_etcd_is_unavailable_within_the_timeout() -> None:
    async def body() -> None:
        backend = create_backend(f"127.0.0.1:{_closed_port()},127.0.0.1:{_closed_port()}", timeout_s=0.5)
        try:
            for call in (backend.get_namespace("x"), backend.list_nodes(), backend.leader()):
                started = time.monotonic()
                with pytest.raises(KVStoreError) as err:
                    await call
                assert err.value.code == ErrorCode.UNAVAILABLE
                assert "etcd at 127.0.0.1:" in err.value.message
                assert time.monotonic() - started < 2.0
        finally:
            await backend.close()
        with pytest.raises(KVStoreError) as err:
            await backend.get_namespace("x")
        assert err.value.code == ErrorCode.UNAVAILABLE

    asyncio.run(asyncio.wait_for(body(), 20))
