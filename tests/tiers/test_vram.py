"""The VRAM tier: a CuPy region on a GPU, GPU puts placed in it, read over CUDA IPC and TCP.

Skips with the reason where CUDA is absent (the placement logic is tested without
CUDA in test_vram_placement.py).
"""

from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

from kvstore.tiers import vram

MiB = 1 << 20
REASON = vram.unavailable_reason(0)


def test_parse_spec() -> None:
    assert vram.parse_spec("10GiB:1") == (10 << 30, 1)
    assert vram.parse_spec("64MiB") == (64 * MiB, 0)
    for bad in ("0:0", "1GiB:gpu"):
        with pytest.raises(ValueError):
            vram.parse_spec(bad)


def test_node_without_cuda_starts_without_the_region(make_cluster) -> None:
    if not REASON:
        pytest.skip("CUDA is present here: the VRAM region is made (see the GPU tests below)")
    cluster = make_cluster(vram="16MiB:0")
    tiers = [t.tier for n in cluster.stats().nodes for t in n.tiers]
    assert tiers == ["dram"]
    assert "VRAM tier off" in cluster.log_tail()


@pytest.mark.skipif(bool(REASON), reason=f"no VRAM tier here: {REASON}")
def test_vram_region_roundtrip_and_checksums() -> None:
    region = vram.VramRegion(8 * MiB, 0)
    try:
        assert len(region.ipc_handle) == 64
        src_buf = mmap.mmap(-1, 2 * MiB)
        dst_buf = mmap.mmap(-1, 2 * MiB)
        src = np.frombuffer(src_buf, dtype=np.uint8)
        dst = np.frombuffer(dst_buf, dtype=np.uint8)
        src[:] = np.random.default_rng(1).integers(0, 256, len(src), dtype=np.uint8)
        slots = np.array([4 * MiB, 1 * MiB], dtype=np.uint64)
        sizes = np.array([MiB, MiB], dtype=np.uint64)
        addresses = np.uint64(src.ctypes.data) + np.array([0, MiB], dtype=np.uint64)
        region.copy_from_host(slots, addresses, sizes)
        region.copy_to_host(slots, np.uint64(dst.ctypes.data) + np.array([0, MiB], dtype=np.uint64), sizes)
        np.testing.assert_array_equal(src, dst)
        region.remember(slots, np.array([5, 6], dtype=np.uint64))
        assert region.verify(slots, np.array([5, 7], dtype=np.uint64)).tolist() == [True, False]
    finally:
        region.close()


@pytest.mark.skipif(bool(REASON), reason=f"no VRAM tier here: {REASON}")
def test_vram_batched_moves_with_a_registered_host_span() -> None:
    """Many slots of one move are one kernel launch over the registered host mapping; shuffled, odd sizes."""
    from kvstore.gpu import hostreg

    region = vram.VramRegion(16 * MiB, 0)
    host_buf = mmap.mmap(-1, 8 * MiB)
    back_buf = mmap.mmap(-1, 8 * MiB)
    host = np.frombuffer(host_buf, dtype=np.uint8)
    back = np.frombuffer(back_buf, dtype=np.uint8)
    try:
        rng = np.random.default_rng(7)
        host[:] = rng.integers(0, 256, len(host), dtype=np.uint8)
        count, unit = 96, 64 * 1024
        slots = (rng.permutation(16 * MiB // unit)[:count].astype(np.uint64)) * np.uint64(unit)
        places = (rng.permutation(8 * MiB // unit)[:count].astype(np.uint64)) * np.uint64(unit)
        sizes = rng.integers(1, unit // 8, count).astype(np.uint64) * np.uint64(8)
        span = (int(host.ctypes.data), len(host))
        region.copy_from_host(slots, np.uint64(host.ctypes.data) + places, sizes, span)
        back_span = (int(back.ctypes.data), len(back))
        region.copy_to_host(slots, np.uint64(back.ctypes.data) + places, sizes, back_span)
        for place, size in zip(places.tolist(), sizes.tolist(), strict=True):
            np.testing.assert_array_equal(back[place : place + size], host[place : place + size])
        with pytest.raises(Exception, match="outside"):
            beyond = np.array([back.ctypes.data + len(back)], dtype=np.uint64)
            region.copy_to_host(slots[:1], beyond, sizes[:1], back_span)
    finally:
        region.close()
        hostreg.unregister(int(host.ctypes.data))
        hostreg.unregister(int(back.ctypes.data))
        del host, back


@pytest.mark.skipif(bool(REASON), reason=f"no VRAM tier here: {REASON}")
def test_node_with_vram_registers_the_region(make_cluster) -> None:
    cluster = make_cluster(vram="64MiB:0")
    tiers = sorted(t.tier for n in cluster.stats().nodes for t in n.tiers)
    assert tiers == ["dram", "vram"]


# ------------------------------------------------------------------ vram: the data path (puts land in VRAM)

PAGE = 16
LAYERS = 3


def _namespace(writer):
    return writer.create_namespace(
        page_size=PAGE, num_layers=LAYERS, kind="mha", kv_heads=4, head_dim=64, dtype="bfloat16"
    )


def _tier_usage(cluster):
    (node,) = cluster.stats().nodes
    return {t.tier: t for t in node.tiers}


def _gpu_put(writer, tokens, layout, seed):
    import cupy

    pages = len(tokens) // PAGE
    rng = np.random.default_rng(seed)
    host = np.stack(
        [rng.integers(0, 256, (pages, layout.segment_bytes), dtype=np.uint8) for _ in range(LAYERS)]
    )
    for layer in range(LAYERS):
        assert writer.put_layer(tokens, layer, cupy.asarray(host[layer])) == pages
    return host


def _ipc_opened(client):
    return sorted(n for n, (_, ipc) in client._transports._ipc.items() if ipc is not None and ipc._pointers)


@pytest.mark.skipif(bool(REASON), reason=f"no VRAM tier here: {REASON}")
def test_gpu_put_lands_in_vram_and_reads_back_over_ipc_and_tcp(
    make_cluster, client, namespace, workers
) -> None:
    import cupy

    from kvstore.testing import committed_checksums, get_layers, get_layers_gpu, prompt, row_hashes

    cluster = make_cluster(vram="64MiB:0")
    node_id = cluster.nodes[0].node_id
    writer = client(cluster, namespace)
    layout = _namespace(writer)
    tokens = prompt(41, 9 * PAGE + 5)
    host = _gpu_put(writer, tokens, layout, 41)
    usage = _tier_usage(cluster)
    assert usage["vram"].pages == 9 and usage["vram"].allocated_bytes == 9 * layout.slot_bytes
    assert usage["dram"].allocated_bytes == 0
    assert _ipc_opened(writer) == [node_id]  # written device to device
    # the checksums committed for it (hashed on the GPU, in VRAM) are the host's XXH3 of the same bytes
    committed = committed_checksums(cluster.nodes[0].control_address, "vram")
    assert set(row_hashes(host.reshape(-1, layout.segment_bytes)).tolist()) <= committed

    # a same-host GPU reader in another process: CUDA IPC, identical bytes
    pages, got, opened = workers.run("gpu-reader", get_layers_gpu, cluster.master_address, namespace, tokens)
    assert (pages, opened) == (9, [node_id])
    assert np.array_equal(got, host)
    # CPU readers (host buffers): the node's data server stages the VRAM slots
    for transport in ("auto", "tcp"):
        pages, layers = workers.run(
            "cpu-reader", get_layers, cluster.master_address, namespace, tokens, transport
        )
        assert pages == 9 and np.array_equal(np.stack(layers), host)
    # a GPU reader forced onto TCP, and a head range
    tcp_reader = client(cluster, namespace, transport="tcp")
    out = cupy.zeros((LAYERS, 9, layout.segment_bytes), dtype=cupy.uint8)
    assert tcp_reader.get_prefix(tokens, out=out).num_pages == 9
    assert np.array_equal(cupy.asnumpy(out), host)
    part = tcp_reader.get_prefix(tokens, heads=(1, 3))
    k, v = layout.head_bytes, layout.segment_bytes // 2  # heads 1..3 of K, then of V
    want = np.concatenate([host[:, :, k : 3 * k], host[:, :, v + k : v + 3 * k]], axis=2)
    assert part.num_pages == 9 and np.array_equal(np.stack([part.layer(i) for i in range(LAYERS)]), want)

    # a GPU writer over TCP (the node stages into VRAM, checksums checked) and a CPU writer that asks for VRAM
    tokens2 = prompt(42, 5 * PAGE)
    host2 = _gpu_put(client(cluster, namespace, transport="tcp"), tokens2, layout, 42)
    tokens3 = prompt(43, 4 * PAGE)
    cpu_writer = client(cluster, namespace, put_tier="vram")
    host3 = np.random.default_rng(43).integers(0, 256, (LAYERS, 4, layout.segment_bytes), dtype=np.uint8)
    for layer in range(LAYERS):
        assert cpu_writer.put_layer(tokens3, layer, host3[layer]) == 4
    assert _tier_usage(cluster)["vram"].pages == 18
    for toks, want in ((tokens2, host2), (tokens3, host3)):
        pages, got, opened = workers.run(
            "gpu-reader", get_layers_gpu, cluster.master_address, namespace, toks
        )
        assert pages == len(toks) // PAGE and np.array_equal(got, want)
    # put_tier=dram keeps a GPU put in DRAM
    tokens4 = prompt(44, 2 * PAGE)
    _gpu_put(client(cluster, namespace, put_tier="dram"), tokens4, layout, 44)
    assert _tier_usage(cluster)["dram"].pages == 2


@pytest.mark.skipif(bool(REASON), reason=f"no VRAM tier here: {REASON}")
def test_vram_demotion_keeps_the_bytes_and_a_prior_lease_reads_its_old_slot(
    make_cluster, client, namespace, workers
) -> None:
    from kvstore.testing import get_layers, get_layers_gpu, prompt, wait_for

    # 48 KiB slots: 4 MiB holds 85; past half full the region demotes down to a quarter
    cluster = make_cluster(vram="4MiB:0", vram_high_watermark=0.5, vram_low_watermark=0.25)
    writer = client(cluster, namespace)
    layout = _namespace(writer)
    assert layout.slot_bytes == 48 * 1024
    tokens_a = prompt(51, 8 * PAGE)
    host_a = _gpu_put(writer, tokens_a, layout, 51)
    lease = writer.acquire_prefix(tokens_a, lease_ms=60_000)
    assert lease.num_pages == 8
    tokens_b = prompt(52, 40 * PAGE)
    host_b = _gpu_put(writer, tokens_b, layout, 52)  # 48 of 85 slots: past high
    wait_for(lambda: _tier_usage(cluster)["dram"].pages > 0, 20, "demotion to DRAM")
    low = 0.25 * 4 * MiB + layout.slot_bytes
    wait_for(lambda: _tier_usage(cluster)["vram"].allocated_bytes <= low, 20, "VRAM under its low watermark")
    usage = _tier_usage(cluster)
    assert usage["vram"].pages + usage["dram"].pages == 48
    # the leased pages did not move: read with the lease in another process, over IPC
    pages, got, opened = workers.run(
        "gpu-reader", get_layers_gpu, cluster.master_address, namespace, tokens_a, lease=lease.lease_id
    )
    assert pages == 8 and opened and np.array_equal(got, host_a)
    # the demoted pages read back identical, on the GPU (DRAM and VRAM pages mixed) and on the CPU
    pages, got, _ = workers.run("gpu-reader", get_layers_gpu, cluster.master_address, namespace, tokens_b)
    assert pages == 40 and np.array_equal(got, host_b)
    pages, layers = workers.run("cpu-reader", get_layers, cluster.master_address, namespace, tokens_b)
    assert pages == 40 and np.array_equal(np.stack(layers), host_b)
    assert writer.release(lease)


@pytest.mark.skipif(bool(REASON), reason=f"no VRAM tier here: {REASON}")
def test_a_reader_whose_vram_slot_was_reused_gets_a_miss(make_cluster, client, namespace) -> None:
    import cupy

    from kvstore import gpu as gpu_plane
    from kvstore.testing import prompt, wait_for
    from kvstore.transports import CopyPlan, node_batches

    cluster = make_cluster(vram="16MiB:0", quarantine_ms=200)
    writer = client(cluster, namespace)
    layout = _namespace(writer)
    tokens = prompt(61, 6 * PAGE)
    host = _gpu_put(writer, tokens, layout, 61)
    lease = writer.acquire_prefix(
        tokens, lease_ms=30_000
    )  # its grants stay unexpired: only generations differ
    assert lease._response is not None
    placements = lease._response.placements
    assert [n.tier for n in placements.nodes] == ["vram"]
    writer.release(lease)  # the lease lapses ...
    cluster.evict(namespace)  # ... the pages go, their slots are quarantined, then reused
    time.sleep(0.5)
    _gpu_put(writer, prompt(62, 6 * PAGE), layout, 62)
    wait_for(lambda: _tier_usage(cluster)["vram"].pages == 6, 10, "the new pages in VRAM")

    reader = client(cluster, namespace)
    heads = (0, layout.kv_heads)
    for transport_mode in ("auto", "tcp"):
        out = cupy.zeros((LAYERS, 6, layout.segment_bytes), dtype=cupy.uint8)
        side = gpu_plane.caller_side(out, "out", layout, list(range(LAYERS)), heads, 6, writable=True)
        plan = CopyPlan(layout, list(range(LAYERS)), heads, side.buffer, 6, side.gpu)
        (batch,), _ = node_batches(placements, np.arange(6))
        other = reader if transport_mode == "auto" else client(cluster, namespace, transport="tcp")
        selector = other._transports
        transport = selector.for_node(batch.node)
        assert transport.name == ("cuda_ipc" if transport_mode == "auto" else "tcp")
        with transport.in_use():
            assert transport.read(batch, plan) == 0  # the generation re-check: a miss, never the new bytes
    assert reader.get_prefix(tokens).num_pages == 0
    assert host.shape == (LAYERS, 6, layout.segment_bytes)
