"""A real etcd for the tests in this directory (started by kvstore.etcd_server.EtcdServer).

``etcd`` is one server for the whole session; tests isolate themselves with their
own cluster name (key prefix).  ``fresh_etcd`` is a server of the test's own, for
tests that kill, pause or compact it; ``etcd_cluster3`` is a 3-member etcd of the
test's own, for tests that kill one member.  Without an etcd binary these tests skip,
saying how to get one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from kvstore.etcd_server import EtcdCluster, EtcdServer, find_etcd

_names = itertools.count(1)


def _binary() -> str:
    try:
        return find_etcd()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _running_etcd() -> Iterator[EtcdServer]:
    server = EtcdServer(binary=_binary())
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    """One etcd for the whole session (tests use their own cluster prefix)."""
    yield from _running_etcd()


@pytest.fixture
def fresh_etcd() -> Iterator[EtcdServer]:
    """An etcd of the test's own, for tests that kill or restart it."""
    yield from _running_etcd()


@pytest.fixture
def cluster_name(request: pytest.FixtureRequest) -> str:
    return f"t{next(_names)}-{request.node.name[:40].replace('/', '_').replace('[', '_').replace(']', '')}"


@pytest.fixture
def etcd_cluster3() -> Iterator[EtcdCluster]:
    """A 3-member etcd of the test's own, for tests that kill one member."""
    cluster = EtcdCluster(3, binary=_binary())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()
