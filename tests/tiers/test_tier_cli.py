"""``kvstore stats / pin / unpin / evict --tier|--node|--tokens / drain`` against real processes."""

from __future__ import annotations

import json

import numpy as np

from kvstore.testing import page_bytes, prompt, run_cli

PAGE = 16
LAYERS = 2
SEGMENT = 64 << 10


def _put(c, seed: int, pages: int) -> np.ndarray:
    tokens = prompt(seed, pages * PAGE)
    for layer in range(LAYERS):
        assert c.put_layer(tokens, layer, page_bytes(seed * 10 + layer, pages, SEGMENT)) == pages
    return tokens


def test_tier_commands(make_cluster, client) -> None:
    cluster = make_cluster(2, dram="16MiB", nvme="16MiB", arena_bytes="1MiB", max_pin_ms=60_000)
    c = client(cluster, "cli/tiers")
    c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
    master = ["--master", cluster.master_address]
    tokens = _put(c, 1, 4)
    others = [_put(c, 10 + i, 2) for i in range(4)]

    stats = run_cli("stats", *master)
    assert stats.returncode == 0, stats.stderr
    assert "nvme" in stats.stdout and "demoted" in stats.stdout and "segments" in stats.stdout
    data = json.loads(run_cli("stats", "--json", *master).stdout)
    assert {t["tier"] for n in data["nodes"] for t in n["tiers"]} == {"dram", "nvme"}

    token_arg = ",".join(str(t) for t in tokens.tolist())
    pin = run_cli("pin", *master, "--namespace", "cli/tiers", "--tokens", token_arg, "--ttl-s", "30")
    assert pin.returncode == 0, pin.stderr
    assert "pinned 4 of 4 pages" in pin.stdout
    evict = run_cli("evict", *master, "--all")
    assert evict.returncode == 0, evict.stderr
    assert c.match_prefix(tokens) == 4 * PAGE, "pinned"
    assert all(c.match_prefix(t) == 0 for t in others)
    unpin = run_cli("unpin", *master, "--namespace", "cli/tiers", "--tokens", token_arg)
    assert "unpinned 4 pages" in unpin.stdout, unpin.stdout + unpin.stderr

    # evict a prefix by its second page: that page and every page extending it go, the first stays
    from kvstore import keys

    page_keys = keys.page_keys(keys.namespace_root("cli/tiers"), tokens, PAGE)
    evict = run_cli("evict", *master, "--namespace", "cli/tiers", "--key", page_keys[1].hex())
    assert evict.returncode == 0, evict.stderr
    assert "evicted 3 pages" in evict.stdout, evict.stdout
    assert c.match_prefix(tokens) == PAGE
    # by tier: nothing is on NVMe here, so nothing goes
    evict = run_cli("evict", *master, "--tier", "nvme")
    assert "evicted 0 pages" in evict.stdout, evict.stdout + evict.stderr
    bad = run_cli("evict", *master, "--tier", "tape")
    assert bad.returncode != 0

    # drain the node holding the page, with the progress output, then it is gone and the page is not
    holder = next(
        n["node_id"]
        for n in json.loads(run_cli("stats", "--json", *master).stdout)["nodes"]
        for t in n["tiers"]
        if t["tier"] == "dram" and t.get("pages", 0)
    )
    drain = run_cli("drain", *master, holder)
    assert drain.returncode == 0, drain.stdout + drain.stderr
    assert f"drain of {holder}: done" in drain.stdout
    assert c.match_prefix(tokens) == PAGE
    hit = c.get_prefix(tokens)
    np.testing.assert_array_equal(hit.layer(1), page_bytes(11, 4, SEGMENT)[:1])
    nodes = {n["node_id"]: n for n in json.loads(run_cli("nodes", "--json", *master).stdout)["nodes"]}
    assert not nodes[holder].get("alive", False)
    again = run_cli("drain", *master, "no-such-node")
    assert again.returncode != 0


def test_drain_with_no_room_elsewhere_fails_and_keeps_the_node(make_cluster, client) -> None:
    # the other node is full (pinned pages): nothing can move, the drain reports it and the node stays
    cluster = make_cluster(2, dram="4MiB", arena_bytes="1MiB", max_pin_ms=60_000)
    c = client(cluster, "cli/full")
    c.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=SEGMENT)
    written = []
    for i in range(40):
        try:
            written.append(_put(c, 100 + i, 1))
        except Exception:  # noqa: BLE001 - NO_ROOM once both nodes are full
            break
    for tokens in written:
        c.pin_prefix(tokens, ttl_s=60)
    stats = json.loads(run_cli("stats", "--json", "--master", cluster.master_address).stdout)
    source = stats["nodes"][0]["node_id"]
    drain = run_cli("drain", "--master", cluster.master_address, source, timeout=120)
    assert drain.returncode == 1, drain.stdout + drain.stderr
    assert "failed" in drain.stdout and "found no room" in drain.stdout
    nodes = {
        n["node_id"]: n
        for n in json.loads(run_cli("nodes", "--json", "--master", cluster.master_address).stdout)["nodes"]
    }
    assert nodes[source]["alive"]
    assert sum(c.match_prefix(t) for t in written) == len(written) * PAGE
