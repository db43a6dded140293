"""Where the time of a GPU put_layer / get_prefix goes (cProfile), beside the bare kernel.

source bench/gpu/prepare.sh && python bench/gpu/profile_paths.py
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kvstore.testing import Cluster, prompt  # noqa: E402

PAGES = 16384
TOP = int(os.environ.get("PROFILE_TOP", "8"))


def _top(profile: cProfile.Profile) -> None:
    """The TOP functions by own time, in microseconds (pstats rounds to milliseconds)."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:TOP]
    for (path, line, name), (_, calls, own, cum, _) in rows:
        where = f"{os.path.basename(path)}:{line}({name})"
        print(f"  {1e6 * own:9.0f} us own {1e6 * cum:9.0f} us cum {calls:5d}x  {where[:110]}")


def main() -> None:
    import torch

    with Cluster(
        1, dram=str(PAGES * 256 * 1024 * 2 + (256 << 20)), read_lease_ms=60000, write_lease_ms=120000
    ) as cluster:
        client = cluster.client("prof/gpu", copy_threads=8)
        layout = client.create_namespace(
            page_size=16, num_layers=4, kind="mha", kv_heads=8, head_dim=128, dtype="bfloat16"
        )
        kv = torch.randint(0, 255, (PAGES, layout.segment_bytes), dtype=torch.uint8, device="cuda")
        warm = prompt(99, 4 * 16)
        for layer in range(4):
            client.put_layer(warm, layer, kv[:4])
        tokens = prompt(1, PAGES * 16)
        client.put_layer(tokens, 0, kv)
        for layer, name in ((1, "put middle layer"), (2, "put middle layer")):
            profile = cProfile.Profile()
            t0 = time.perf_counter()
            profile.enable()
            client.put_layer(tokens, layer, kv)
            profile.disable()
            print(f"== {name}: {1000 * (time.perf_counter() - t0):.1f} ms")
            _top(profile)
        client.put_layer(tokens, 3, kv)
        lease = client.acquire_prefix(tokens)
        for _ in range(2):
            profile = cProfile.Profile()
            t0 = time.perf_counter()
            profile.enable()
            client.get_prefix(tokens, layers=[1], out=kv, lease=lease)
            profile.disable()
            print(f"== get leased: {1000 * (time.perf_counter() - t0):.1f} ms")
            _top(profile)
        t0 = time.perf_counter()
        keys = client._page_keys(tokens, PAGES, None)
        print(f"page keys: {1000 * (time.perf_counter() - t0):.1f} ms for {len(keys) // 16} pages")
        client.close()


if __name__ == "__main__":
    main()
