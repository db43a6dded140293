"""Leader election and failover with real processes: masters, nodes, etcd and clients (issue 3).

Each test prints the times it measured (``pytest -s`` shows them); the failover
bound stated in docs/control-plane.md comes from these.  Nothing sleeps to
synchronise: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client import KVStoreClient
from kvstore.config import load
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error
from kvstore.testing import (
    Cluster,
    check_serves,
    page_bytes,
    process_pool,
    prompt,
    put_get_workload,
    spawn_context,
    submit,
    wait_for,
)

PAGE = 4
LAYERS = 2
SEGMENT = 4096
PAGES = 4
FAILOVER_BOUND_S = (
    5.0  # what these tests hold a failover to (1 s leader lease); docs state the measured value
)


def create(client: KVStoreClient) -> None:
    client.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)


def data(seed: int, pages: int = PAGES) -> list[np.ndarray]:
    """The layers the workload writes for ``seed`` (kvstore.testing.put_get_workload's scheme)."""
    return [page_bytes(seed * 1000 + layer, pages, SEGMENT) for layer in range(LAYERS)]


def put(client: KVStoreClient, seed: int, pages: int = PAGES) -> None:
    tokens = prompt(seed, pages * PAGE)
    for layer, kv in enumerate(data(seed, pages)):
        assert client.put_layer(tokens, layer, kv) == pages


def read(client: KVStoreClient, seed: int, pages: int = PAGES) -> int:
    """Pages of ``seed`` read back; their bytes must be the written ones (a miss is fine, wrong bytes never)."""
    hit = client.get_prefix(prompt(seed, pages * PAGE))
    for layer, kv in enumerate(data(seed, pages)):
        assert np.array_equal(hit.layer(layer), kv[: hit.num_pages]), f"seed {seed}: other bytes"
    return int(hit.num_pages)


def raw_call(address: str, method: str, request: Any, stub: Any = pb_grpc.KVStoreStub) -> Any:
    """One call to one particular master; returns the response or the KVStoreError (with the raw error)."""
    with grpc.insecure_channel(address) as channel:
        try:
            return getattr(stub(channel), method)(request, timeout=5.0)
        except grpc.RpcError as err:
            exc = from_rpc_error(err)
            exc.rpc_error = err  # type: ignore[attr-defined]
            return exc


def committed_on_nodes(cluster: Cluster) -> int:
    """Layer commits the nodes have been told of (a leader sends them in the background)."""
    total = 0
    for node in cluster.nodes:
        if node.process is not None and node.process.alive():
            with grpc.insecure_channel(node.control_address) as channel:
                inventory = pb_grpc.NodeStub(channel).GetInventory(pb.InventoryRequest(), timeout=5.0)
            total += len(inventory.slots.commit_slots) // 8
    return total


def node_stats(control_address: str) -> pb.NodeStatsResponse:
    with grpc.insecure_channel(control_address) as channel:
        return pb_grpc.NodeStub(channel).GetStats(pb.NodeStatsRequest(), timeout=5.0)


def kvstore_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli.main", *args], capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------- standbys, clean hand-over, warm-up


def test_standby_names_the_leader_and_a_new_leader_warms_up(etcd_cluster: Any, namespace: str) -> None:
    cluster: Cluster = etcd_cluster(nodes=1, masters=2, warmup_ms=3000)
    leader = cluster.wait_leader()
    standby = 1 - leader
    leader_address, standby_address = cluster.master_addresses[leader], cluster.master_addresses[standby]

    # A standby answers every KVStore and NodeRegistry call with NOT_LEADER naming the leader ...
    refused = raw_call(standby_address, "ListNamespaces", pb.ListNamespacesRequest())
    assert isinstance(refused, KVStoreError) and refused.code is ErrorCode.NOT_LEADER
    assert refused.rpc_error.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert refused.leader == leader_address and leader_address in refused.message
    beat = raw_call(
        standby_address, "Heartbeat", pb.HeartbeatRequest(node_id="x"), stub=pb_grpc.NodeRegistryStub
    )
    assert isinstance(beat, KVStoreError) and beat.leader == leader_address
    # ... and Admin ListNodes with the leader and the registered nodes.
    listed = raw_call(standby_address, "ListNodes", pb.ListNodesRequest(), stub=pb_grpc.AdminStub)
    assert listed.leader_address == leader_address and listed.term == 1
    assert [n.node_id for n in listed.nodes] == [cluster.nodes[0].node_id]

    # `kvstore nodes` finds both masters through etcd alone and says who leads.
    shown = kvstore_cli("--etcd", cluster.etcd_endpoint, "--cluster", cluster.cluster_name, "nodes", "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    roles = {m["address"]: m["role"] for m in view["masters"]}
    assert roles == {leader_address: "leader", standby_address: "standby"}
    assert [(n["node_id"], n["alive"], n["registered"]) for n in view["nodes"]] == [
        (cluster.nodes[0].node_id, True, True)
    ]
    table = kvstore_cli("--master", standby_address, "nodes")
    assert table.returncode == 0 and "standby" in table.stdout and "lease age" in table.stdout

    # A client that knows only etcd (and a wrong master address) finds the leader there.  It waits
    # out a leader change for at most 1 s: longer than a hand-over, shorter than the warm-up below.
    settings = {"etcd": cluster.etcd_endpoint, "cluster": cluster.cluster_name, "failover_wait_ms": 1000}
    client = KVStoreClient("127.0.0.1:1", namespace=namespace, config=load(settings, environ={}))
    try:
        create(client)
        put(client, 1)

        # A clean stop resigns: the standby leads at once (no lease to wait out).
        started = time.monotonic()
        cluster.stop_master(leader)
        assert cluster.wait_leader(exclude=[leader]) == standby
        handover_s = time.monotonic() - started
        print(f"\nhand-over after a clean stop: {handover_s * 1000:.0f} ms")

        # The new leader serves reads at once: the page was rebuilt from the node's inventory.
        assert read(client, 1) == PAGES
        # It allocates nothing on the adopted node during its first lease period (3 s here); the
        # client does not wait for the hint it gets, longer than its failover_wait_ms ...
        with pytest.raises(KVStoreError) as warming:
            put(client, 2)
        assert warming.value.code is ErrorCode.UNAVAILABLE and "warming up" in warming.value.message
        assert 0 < warming.value.retry_after_ms <= 3000
        # ... and takes puts once it is over.
        wait_for(lambda: _put_ok(client, 2), 10.0, "puts after the warm-up")
        assert read(client, 2) == PAGES
    finally:
        client.close()


def _put_ok(client: KVStoreClient, seed: int) -> bool:
    try:
        put(client, seed)
    except KVStoreError as exc:
        if exc.code is not ErrorCode.UNAVAILABLE:
            raise
        return False
    return True


# ---------------------------------------------------------------- kill -9 the leader under load


def test_leader_killed_during_a_workload(etcd_cluster: Any, namespace: str) -> None:
    cluster: Cluster = etcd_cluster(nodes=2, masters=2)
    with cluster.client(namespace) as setup:
        create(setup)
    context = spawn_context()
    with context.Manager() as manager, process_pool(1) as pool:
        progress, stop = manager.Queue(), manager.Event()
        future = submit(pool, put_get_workload, cluster.master_address, namespace, 100, progress, stop)
        completed: list[tuple[int, float]] = []

        def puts_done(at_least: int, after: float = 0.0) -> bool:
            while not progress.empty():
                completed.append(progress.get())
            return sum(1 for _, t in completed if t > after) >= at_least

        # enough puts whose commit notices have surely reached their nodes (see below), and more coming
        wait_for(
            lambda: puts_done(10) and sum(1 for _, t in completed if t < time.time() - 0.6) >= 5,
            30.0,
            "the workload's first puts",
        )
        leader = cluster.wait_leader()
        killed_at = time.time()
        cluster.kill_master(leader)
        successor = cluster.wait_leader(exclude=[leader])
        failover_s = time.time() - killed_at
        wait_for(lambda: puts_done(5, after=killed_at), 30.0, "puts after the failover")
        resumed_s = min(t for _, t in completed if t > killed_at) - killed_at
        stop.set()
        report = future.result(60)

    print(
        f"\nleader kill -9 -> standby serving: {failover_s:.2f} s; first put completed after the kill: "
        f"{resumed_s:.2f} s (includes the 2 s warm-up on adopted nodes); errors seen by the workload: "
        f"{report['errors']}; longest call {report['max_call_s']:.2f} s"
    )
    assert successor != leader and failover_s < FAILOVER_BOUND_S
    assert report["wrong"] == []  # never other bytes
    # puts caught by the failover fail cleanly and succeed when retried
    assert set(report["errors"]) <= {"NOT_LEADER", "SESSION_NOT_FOUND", "UNAVAILABLE"}
    assert report["max_call_s"] < 10.0  # nothing hung

    # Every page committed on a live node before the failover is readable again, with identical bytes.
    # (A commit notice still in flight to its node when the leader died may be lost: half a second of margin.)
    settled = [seed for seed, t in report["done"] if t < killed_at - 0.5]
    with cluster.client(namespace) as reader:
        assert len(settled) >= 5 and all(read(reader, seed) == PAGES for seed in settled)
        assert all(read(reader, seed) == PAGES for seed, t in report["done"] if t > killed_at)


# ---------------------------------------------------------------- a paused (partitioned) leader


def test_paused_leader_wakes_up_fenced(etcd_cluster: Any, namespace: str) -> None:
    cluster: Cluster = etcd_cluster(nodes=1, masters=2)
    old = cluster.wait_leader()
    # a paused leader answers nothing: calls to it end at their deadline, then go elsewhere
    with cluster.client(namespace, transport="tcp", rpc_timeout_ms=1000) as client:
        create(client)
        put(client, 7)
        lease = client.acquire_prefix(prompt(7, PAGES * PAGE))  # grants of term 1
        assert client.get_prefix(prompt(7, PAGES * PAGE), lease=lease).num_pages == PAGES
        wait_for(lambda: committed_on_nodes(cluster) == PAGES * LAYERS, 10.0, "commit notices on the node")

        cluster.pause_master(old)  # SIGSTOP: it can neither renew its lease nor hear it lapse
        paused_at = time.monotonic()
        new = cluster.wait_leader(exclude=[old])
        print(f"\nSIGSTOP of the leader -> standby serving: {time.monotonic() - paused_at:.2f} s")
        node = cluster.nodes[0].control_address
        rejected = node_stats(node).tiers[0].grant_rejections

        # The node took the new term from the new leader: the old leader's grants are refused.
        stale = client.get_prefix(prompt(7, PAGES * PAGE), lease=lease)
        assert stale.num_pages == 0
        assert node_stats(node).tiers[0].grant_rejections > rejected
        assert read(client, 7) == PAGES  # a fresh lease from the new leader reads the same bytes

        # Woken up, the old leader does not act as one: NOT_LEADER, naming its successor.
        cluster.resume_master(old)
        old_address, new_address = cluster.master_addresses[old], cluster.master_addresses[new]
        for method, request in (
            ("AcquirePrefix", pb.AcquirePrefixRequest(namespace=namespace, keys=bytes(16))),
            ("OpenPut", pb.OpenPutRequest(namespace=namespace, keys=bytes(16))),
        ):
            answer = raw_call(old_address, method, request)
            assert isinstance(answer, KVStoreError) and answer.code is ErrorCode.NOT_LEADER, answer
            assert answer.leader == new_address
        assert cluster.serving_leader(new) and not cluster.serving_leader(old)


# ---------------------------------------------------------------- nodes that die or go quiet


def _pages_by_node(cluster: Cluster, client: KVStoreClient, seeds: range) -> dict[str, list[int]]:
    """Which node holds each seed's pages (each seed's pages sit on one node here)."""
    by_node: dict[str, list[int]] = {}
    for seed in seeds:
        lease = client.acquire_prefix(prompt(seed, PAGES * PAGE))
        nodes = {n.node_id for n in lease._response.placements.nodes}  # type: ignore[union-attr]
        client.release(lease)
        assert len(nodes) == 1
        by_node.setdefault(nodes.pop(), []).append(seed)
    return by_node


def test_killed_node_takes_its_pages_and_only_its_pages(etcd_cluster: Any, namespace: str) -> None:
    cluster: Cluster = etcd_cluster(nodes=2, masters=1)
    with cluster.client(namespace) as client:
        create(client)
        for seed in range(10, 16):
            put(client, seed)
        by_node = _pages_by_node(cluster, client, range(10, 16))
        assert len(by_node) == 2, by_node  # most-free placement spread them
        victim = next(i for i, n in enumerate(cluster.nodes) if n.node_id in by_node)
        lost = by_node[cluster.nodes[victim].node_id]
        kept = [s for s in range(10, 16) if s not in lost]

        cluster.kill_node(victim)
        killed_at = time.monotonic()
        slowest = 0.0

        def all_missed() -> bool:
            nonlocal slowest
            started = time.monotonic()
            pages = [read(client, seed) for seed in lost]  # bytes checked: never stale
            slowest = max(slowest, time.monotonic() - started)
            return not any(pages)

        wait_for(all_missed, 10.0, "the killed node's pages to become misses")
        gone_s = time.monotonic() - killed_at
        print(
            f"\nkill -9 of a node -> its pages are misses after {gone_s:.2f} s; slowest read {slowest:.2f} s"
        )
        assert slowest < 2.0  # reads of a dead node's pages never hang
        victim_id = cluster.nodes[victim].node_id
        wait_for(
            lambda: not any(n.alive for n in cluster.list_nodes().nodes if n.node_id == victim_id),
            10.0,
            "the node declared dead",
        )
        assert all(read(client, seed) == PAGES for seed in kept)  # other pages unaffected
        cluster.restart_node(victim)  # a fresh incarnation joins and takes puts
        check_serves(cluster)


def test_node_back_from_a_pause_reports_its_inventory(etcd_cluster: Any, namespace: str) -> None:
    cluster: Cluster = etcd_cluster(nodes=1, masters=1)
    with cluster.client(namespace, transport="tcp") as client:
        create(client)
        put(client, 30)
        wait_for(lambda: committed_on_nodes(cluster) == PAGES * LAYERS, 10.0, "commit notices on the node")
        process = cluster.nodes[0].process
        assert process is not None
        process.send_signal(signal.SIGSTOP)  # its etcd lease and its heartbeats lapse
        try:
            wait_for(lambda: not cluster.list_nodes().nodes[0].alive, 10.0, "the paused node removed")
            assert read(client, 30) == 0  # its pages are misses meanwhile
        finally:
            process.send_signal(signal.SIGCONT)
        # It registers again (etcd and master), the leader adopts its inventory: the page is back.
        wait_for(lambda: read(client, 30) == PAGES, 10.0, "the node's pages back after it re-registered")


# ---------------------------------------------------------------- etcd restart


def test_etcd_restart_the_cluster_reconnects(etcd_cluster: Any, namespace: str) -> None:
    cluster: Cluster = etcd_cluster(nodes=2, masters=2)
    with cluster.client(namespace) as client:
        create(client)
        put(client, 50)

        # kill -9 and start again at once: etcd keeps what it had synced; nobody notices much.
        cluster.kill_etcd()
        cluster.start_etcd()
        restarted_at = time.monotonic()
        wait_for(lambda: _put_ok(client, 51), 20.0, "puts after a quick etcd restart")
        print(f"\netcd kill -9 + start: puts work again after {time.monotonic() - restarted_at:.2f} s")

        # Down for longer than the leader lease: the leader cannot prove its lease and steps down ...
        term_before = cluster.list_nodes().term
        cluster.kill_etcd()
        wait_for(lambda: cluster.leader_index() is None, 20.0, "the leader to step down without etcd")
        cluster.start_etcd()
        restarted_at = time.monotonic()
        # ... and when etcd is back, a leader is elected again, rebuilds, and serves what was stored.
        wait_for(lambda: _read_ok(client, 50), 20.0, "reads after the etcd outage")
        print(
            f"etcd down past the leader lease: reads work again {time.monotonic() - restarted_at:.2f} s "
            f"after etcd is back (term {term_before} -> {cluster.list_nodes().term})"
        )
        assert cluster.list_nodes().term > term_before
        assert read(client, 51) == PAGES
        wait_for(lambda: _put_ok(client, 52), 20.0, "puts after the etcd outage (past the warm-up)")

        # The node watch works again: a node that leaves (its registration revoked) is dropped at once.
        leader = cluster.wait_leader()
        leaving = cluster.nodes[1].node_id
        cluster.kill_node(1, sig=signal.SIGTERM)
        wait_for(
            lambda: not any(n.alive for n in cluster.list_nodes().nodes if n.node_id == leaving),
            10.0,
            "the stopped node removed",
        )
        log = cluster.masters[leader]
        assert log is not None
        wait_for(
            lambda: f"node {leaving}: its registration lapsed" in Path(log.log_path).read_text(),
            10.0,
            "the leader to see the registration go (node watch)",
        )


def _read_ok(client: KVStoreClient, seed: int) -> bool:
    try:
        return read(client, seed) == PAGES
    except KVStoreError as exc:
        if exc.code not in (ErrorCode.UNAVAILABLE, ErrorCode.NOT_LEADER):
            raise
        return False
