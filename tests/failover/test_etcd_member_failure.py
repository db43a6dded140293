"""Invariant 6 for etcd: killing one member of a 3-member etcd loses nothing and the cluster heals.

Masters and nodes are given all three etcd endpoints and move to the next one
when a call fails (kvstore.metadata.etcd).  Every member is killed in turn
(SIGKILL), with the cluster checked while it is down and again after it rejoins.
Nothing sleeps to synchronise: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvstore.client import KVStoreClient
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.testing import Cluster, check_serves, page_bytes, prompt, wait_for

PAGE = 4
LAYERS = 2
SEGMENT = 4096
PAGES = 4
LEADER_BOUND_S = 5.0  # a leader change, if any, takes about one 1 s leader lease
# How long each member stays down while the cluster is watched: longer than the leader lease (1 s)
# and the node TTL (1.5 s), so a process stuck on the dead endpoint would lose its lease meanwhile.
DOWN_WATCH_S = 2.5
HEAL_BOUND_S = 15.0  # a put through a leader change also waits out the new leader's 2 s warm-up


def data(seed: int) -> list[np.ndarray]:
    return [page_bytes(seed * 1000 + layer, PAGES, SEGMENT) for layer in range(LAYERS)]


def retry_unavailable(call: Callable[[], Any], within_s: float, what: str) -> Any:
    """``call()`` retried while it fails UNAVAILABLE (a leader change under way), up to a deadline."""
    outcome: list[Any] = []

    def attempt() -> bool:
        try:
            outcome.append(call())
        except KVStoreError as exc:
            if exc.code is not ErrorCode.UNAVAILABLE:
                raise
            return False
        return True

    wait_for(attempt, within_s, what)
    return outcome[-1]


def put(client: KVStoreClient, seed: int) -> None:
    tokens = prompt(seed, PAGES * PAGE)
    for layer, kv in enumerate(data(seed)):
        written = retry_unavailable(
            lambda: client.put_layer(tokens, layer, kv),  # noqa: B023 - called before the loop moves on
            HEAL_BOUND_S,
            f"a put of seed {seed} layer {layer}",
        )
        assert written == PAGES, f"seed {seed} layer {layer}: wrote {written} pages"


def assert_all_read_back(client: KVStoreClient, seeds: list[int]) -> None:
    """Every committed page of every seed comes back, with the bytes that were written."""
    for seed in seeds:
        hit = retry_unavailable(
            lambda: client.get_prefix(prompt(seed, PAGES * PAGE)),  # noqa: B023
            HEAL_BOUND_S,
            f"a read of seed {seed}",
        )
        assert hit.num_pages == PAGES, f"seed {seed}: {hit.num_pages} of {PAGES} pages came back"
        for layer, kv in enumerate(data(seed)):
            assert np.array_equal(hit.layer(layer), kv), f"seed {seed} layer {layer}: other bytes"


def leaders(cluster: Cluster) -> list[int]:
    return [i for i in range(cluster.master_count) if cluster.serving_leader(i, timeout=1.0)]


def wait_one_leader(cluster: Cluster, what: str) -> int:
    """Exactly one master leads within LEADER_BOUND_S; never two at once while we look."""

    def one() -> int | None:
        cluster.check_alive()
        now = leaders(cluster)
        assert len(now) <= 1, f"{what}: masters {now} all serve as leader"
        return now[0] + 1 if len(now) == 1 else None

    return int(wait_for(one, LEADER_BOUND_S, f"exactly one leader {what}")) - 1


def holds(check: Callable[[], bool], seconds: float, what: str) -> None:
    """``check()`` stays true for ``seconds`` (polled): an invariant over a window, not a wait."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.05)


def not_yet_switched(cluster: Cluster, to_endpoint: str) -> list[str]:
    """Live masters and nodes whose log does not say they moved to ``to_endpoint`` (kvstore.metadata.etcd logs it)."""
    stuck = []
    for process in cluster.processes():
        if process.alive():
            with open(process.log_path, errors="replace") as fh:
                if f"switching to endpoint {to_endpoint}" not in fh.read():
                    stuck.append(process.name)
    return stuck


def test_killing_each_etcd_member_in_turn_loses_nothing(etcd_cluster: Any, namespace: str) -> None:
    cluster: Cluster = etcd_cluster(nodes=1, masters=2, etcd_members=3)
    assert len(cluster.etcd_endpoint.split(",")) == 3
    client = cluster.client(namespace)
    client.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
    written = [1, 2, 3]
    for seed in written:
        put(client, seed)
    next_seed = len(written) + 1

    # Every process starts on the first endpoint, so member 0 is the one in use when it dies.
    for member in range(3):
        leader_before = wait_one_leader(cluster, "before the kill")
        started = time.monotonic()
        cluster.etcd_member(member).kill()

        leader = wait_one_leader(cluster, f"with etcd member {member} dead")
        if member == 0:
            # Everyone was on it: each master and node must notice and move to the next member.
            following = cluster.etcd_member(1).endpoint
            wait_for(
                lambda: not not_yet_switched(cluster, following),  # noqa: B023
                LEADER_BOUND_S,
                f"every process to move to {following}",
            )
        # Kept down past the leader lease and node TTL: one leader and a live node throughout.
        holds(
            lambda: len(leaders(cluster)) == 1 and all(n.alive for n in cluster.list_nodes().nodes),
            DOWN_WATCH_S,
            f"one leader and live nodes while etcd member {member} is down",
        )
        assert_all_read_back(client, written)
        put(client, next_seed)
        written.append(next_seed)
        next_seed += 1
        cluster.wait_nodes_alive(len(cluster.nodes), HEAL_BOUND_S)
        down_s = time.monotonic() - started

        cluster.etcd_member(member).start()  # rejoins on its old ports and data directory
        wait_one_leader(cluster, f"after etcd member {member} came back")
        put(client, next_seed)
        written.append(next_seed)
        next_seed += 1
        assert_all_read_back(client, written)
        print(
            f"\netcd member {member} killed: leader {leader_before} -> {leader}, "
            f"checks with it down took {down_s * 1000:.0f} ms"
        )

    check_serves(cluster)
    cluster.check_alive()
