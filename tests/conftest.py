"""Shared fixtures: real-process clusters (kvstore.testing.Cluster), clients, spawned worker processes.

Clusters are module-scoped where tests can share one (each test uses its own
namespace); tests that need a clean or oddly sized cluster ask ``make_cluster``.
When a test fails, the tails of its clusters' process logs are attached to the
report.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvstore.testing import FAST_SETTINGS as FAST
from kvstore.testing import Cluster, process_pool, submit

CALL_TIMEOUT_S = 60.0
_CLUSTERS_ATTR = "_kvstore_clusters"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: end-to-end test with real master/node processes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for cluster in getattr(item, _CLUSTERS_ATTR, []):
            report.sections.append((f"kvstore cluster logs ({cluster.log_dir})", cluster.log_tail()))


def _attach(request: pytest.FixtureRequest, cluster: Cluster) -> Cluster:
    clusters = getattr(request.node, _CLUSTERS_ATTR, [])
    clusters.append(cluster)
    setattr(request.node, _CLUSTERS_ATTR, clusters)
    cluster.check_alive()
    return cluster


@pytest.fixture(scope="module")
def _cluster_1node() -> Iterator[Cluster]:
    with Cluster(1, dram="64MiB", **FAST) as cluster:  # type: ignore[arg-type]
        yield cluster


@pytest.fixture(scope="module")
def _cluster_2nodes() -> Iterator[Cluster]:
    with Cluster(2, dram="64MiB", **FAST) as cluster:  # type: ignore[arg-type]
        yield cluster


@pytest.fixture
def cluster(request: pytest.FixtureRequest, _cluster_1node: Cluster) -> Cluster:
    """One node, 64 MiB DRAM, short leases (shared by the tests of a module)."""
    return _attach(request, _cluster_1node)


@pytest.fixture
def cluster2(request: pytest.FixtureRequest, _cluster_2nodes: Cluster) -> Cluster:
    """Two nodes, 64 MiB DRAM each, short leases (shared by the tests of a module)."""
    return _attach(request, _cluster_2nodes)


@pytest.fixture
def attach(request: pytest.FixtureRequest) -> Callable[[Cluster], Cluster]:
    """``attach(cluster)``: report this cluster's logs if the test fails (for a module's own clusters)."""
    return lambda cluster: _attach(request, cluster)


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """A fresh cluster for this test only: ``make_cluster(nodes=1, dram="16MiB", read_lease_ms=...)``."""
    started: list[Cluster] = []

    def make(nodes: int = 1, **overrides: Any) -> Cluster:
        settings = {**FAST, "dram": "64MiB", **overrides}
        cluster = Cluster(nodes, **settings).start()
        started.append(cluster)
        return _attach(request, cluster)

    yield make
    for cluster in started:
        cluster.stop()


_names = itertools.count()


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A namespace name no other test uses."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:48]
    return f"test/{base}-{next(_names)}"


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``client(cluster, namespace, **cfg)``: a KVStoreClient closed after the test.

    ``create=(page_size, num_layers, segment_bytes)`` also creates the namespace.
    """
    made: list[Any] = []

    def make(cluster: Cluster, namespace: str, create: tuple[int, int, int] | None = None, **cfg: Any) -> Any:
        c = cluster.client(namespace, **cfg)
        made.append(c)
        if create is not None:
            page_size, num_layers, segment_bytes = create
            c.create_namespace(page_size=page_size, num_layers=num_layers, segment_bytes=segment_bytes)
        return c

    yield make
    for c in made:
        close = getattr(c, "close", None)
        if callable(close):
            close()


class Workers:
    """Named spawned processes (one worker each), kept for a module: ``workers.run("writer", fn, *args)``."""

    def __init__(self) -> None:
        self._pools: dict[str, concurrent.futures.ProcessPoolExecutor] = {}
        self._contexts: list[Any] = []

    def pool(self, name: str) -> concurrent.futures.ProcessPoolExecutor:
        if name not in self._pools:
            context = process_pool(1)
            self._pools[name] = context.__enter__()
            self._contexts.append(context)
        return self._pools[name]

    def submit(
        self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        return submit(self.pool(name), fn, *args, **kwargs)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.submit(name, fn, *args, **kwargs).result(CALL_TIMEOUT_S)

    def close(self) -> None:
        for context in self._contexts:
            context.__exit__(None, None, None)
        self._pools.clear()
        self._contexts.clear()


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    """Client processes started with spawn (gRPC does not survive fork), reused across a module's tests."""
    pool = Workers()
    yield pool
    pool.close()
