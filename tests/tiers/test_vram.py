"""The VRAM tier: a CuPy region on a GPU.  Skips with the reason where CUDA is absent."""

from __future__ import annotations

import mmap

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
def test_node_with_vram_registers_the_region(make_cluster) -> None:
    cluster = make_cluster(vram="64MiB:0")
    tiers = sorted(t.tier for n in cluster.stats().nodes for t in n.tiers)
    assert tiers == ["dram", "vram"]
