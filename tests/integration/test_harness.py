"""The process harness itself: start, readiness, node kill/restart, clean stop, leak detection."""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest

from kvstore.testing import Cluster, ClusterError, check_serves, page_bytes, prompt, wait_for


def test_wait_for_names_what_it_waited_for():
    with pytest.raises(TimeoutError, match="the moon"):
        wait_for(lambda: False, 0.05, "the moon")
    assert wait_for(lambda: 42, 1.0, "an answer") == 42


def test_unknown_settings_are_refused():
    with pytest.raises(TypeError, match="not a kvstore setting"):
        Cluster(1, read_lease=5)
    with pytest.raises(TypeError, match="own argument"):
        Cluster(1, master="x")


def test_two_nodes_start_serve_and_stop_clean(cluster2):
    listed = cluster2.list_nodes()
    assert sorted(n.node_id for n in listed.nodes if n.alive) == ["node0", "node1"]
    assert len(cluster2.pool_files()) == 2
    check_serves(cluster2)


def test_killed_node_is_noticed_and_restarted(make_cluster, client):
    cluster = make_cluster(nodes=2)
    shm_dir = cluster.shm_dir
    c = client(cluster, "harness/restart")
    c.create_namespace(page_size=4, num_layers=1, segment_bytes=4096)
    status = cluster.kill_node(1, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert len(cluster.pool_files()) == 2  # a SIGKILLed node cannot clean up; the next start sweeps it

    def node1_dead() -> bool:
        return any(n.node_id == "node1" and not n.alive for n in cluster.list_nodes().nodes)

    wait_for(node1_dead, 10.0, "the master to notice node1 stopped heartbeating (1.5 s ttl)")
    # the survivor keeps serving: puts land on it
    tokens = prompt(80, 16)
    assert c.put_layer(tokens, 0, page_bytes(80, 4, 4096)) == 4
    np.testing.assert_array_equal(c.get_prefix(tokens).layer(0), page_bytes(80, 4, 4096))

    cluster.restart_node(1)
    assert sorted(n.node_id for n in cluster.list_nodes().nodes if n.alive) == ["node0", "node1"]
    assert len(cluster.pool_files()) == 2  # the orphan was swept, a fresh pool created
    check_serves(cluster)
    cluster.stop()
    assert not os.path.exists(shm_dir)


def test_stop_sweeps_files_of_killed_nodes():
    cluster = Cluster(1, dram="16MiB", heartbeat_ms=200, node_ttl_ms=1500).start()
    shm_dir = cluster.shm_dir
    cluster.kill_node(0)
    assert len(cluster.pool_files()) == 1
    cluster.stop()  # no error: the file belonged to a node we SIGKILLed
    assert not os.path.exists(shm_dir)


def test_start_failure_reports_the_log():
    cluster = Cluster(1, dram="1", startup_timeout=30)  # a node cannot have a 1-byte pool
    with pytest.raises(ClusterError) as err:
        cluster.start()
    assert "node0" in str(err.value) and "exited with status" in str(err.value)
    assert cluster.master is not None and not cluster.master.alive()  # what did start was stopped
    assert os.path.isdir(cluster.log_dir)  # kept for the post-mortem
    shutil.rmtree(cluster.log_dir)
