"""A new leader rebuilds NVMe-resident pages from the node's NVMe inventory (issue 4 with issue 3).

Needs an etcd binary (two masters); skips with the reason otherwise.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvstore.errors import KVStoreError
from kvstore.etcd_server import find_etcd
from kvstore.testing import FAST_ETCD_SETTINGS, Cluster, page_bytes, prompt, wait_for

PAGE = 16
LAYERS = 4
SEGMENT = 64 << 10


def test_new_leader_adopts_nvme_pages_and_serves_them(attach) -> None:
    try:
        find_etcd()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    settings = {
        **FAST_ETCD_SETTINGS,
        "dram": "16MiB",
        "nvme": "32MiB",
        "high_watermark": 0.75,
        "low_watermark": 0.5,
        "arena_bytes": "1MiB",
    }
    with Cluster(1, masters=2, etcd=True, **settings) as cluster:
        attach(cluster)
        c = cluster.client("tiers/failover")
        c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
        written = []
        for i in range(16):
            tokens = prompt(50 + i, 4 * PAGE)
            data = [page_bytes(i * 10 + layer, 4, SEGMENT) for layer in range(LAYERS)]
            for layer in range(LAYERS):
                assert c.put_layer(tokens, layer, data[layer]) == 4
            written.append((tokens, data))
            time.sleep(0.02)

        def on_nvme() -> int:
            return sum(t.pages for n in cluster.stats().nodes for t in n.tiers if t.tier == "nvme")

        wait_for(lambda: on_nvme() > 0, 10.0, "pages to be demoted to NVMe")
        time.sleep(0.3)  # the frees of demoted DRAM slots reach the node
        leader = cluster.wait_leader()
        cluster.kill_master(leader)
        cluster.wait_leader(exclude=[leader])

        # the new leader warms up (old leases may live), then serves every page, NVMe ones promoted
        def all_back() -> bool:
            try:
                return all(c.get_prefix(t).num_pages == 4 for t, _ in written)
            except KVStoreError:
                return False

        wait_for(all_back, 20.0, "every page to be served by the new leader")
        for tokens, data in written:
            hit = c.get_prefix(tokens)
            for layer in range(LAYERS):
                np.testing.assert_array_equal(hit.layer(layer), data[layer])
