"""Failover tests: real etcd, several masters, nodes and clients as processes (kvstore.testing.Cluster).

Every test starts a cluster of its own (they kill and pause its processes), with
the fast settings of :data:`kvstore.testing.FAST_ETCD_SETTINGS` (1 s leader lease,
200 ms heartbeats, 1.5 s node TTL, 2 s leases).  Without an etcd binary they skip,
saying how to get one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvstore.etcd_server import find_etcd
from kvstore.testing import FAST_ETCD_SETTINGS, Cluster


@pytest.fixture
def etcd_cluster(
    request: pytest.FixtureRequest, attach: Callable[[Cluster], Cluster]
) -> Iterator[Callable[..., Cluster]]:
    """``etcd_cluster(nodes=2, masters=2, **settings)``: a started cluster on its own etcd, stopped after the test."""
    try:
        find_etcd()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    started: list[Cluster] = []

    def make(nodes: int = 1, masters: int = 2, **overrides: Any) -> Cluster:
        settings = {**FAST_ETCD_SETTINGS, "dram": "32MiB", **overrides}
        cluster = Cluster(nodes, masters=masters, etcd=True, **settings)
        started.append(cluster)
        return attach(cluster.start())

    yield make
    for cluster in started:
        cluster.stop()
