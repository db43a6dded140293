"""Print the headline numbers of bench_gpu.py JSON files (GB/s and % of the single pinned copy).

python bench/gpu/summary.py $OUT/bench_gpu.json [$OUT/stream_1GiB.json ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def _row(name: str, gbps: float, base: float | None) -> str:
    share = f"{100 * gbps / base:5.1f}%" if base else ""
    return f"{name:<58} {gbps:7.1f} GB/s {share}"


def summarize(result: dict[str, Any]) -> list[str]:
    lines = [f"gpu: {result.get('gpu')}"]
    base = result.get("baselines", {})
    d2h = base.get("memcpy_1GiB_pinned_D2H", {}).get("GBps")
    h2d = base.get("memcpy_1GiB_pinned_H2D", {}).get("GBps")
    for key, value in base.items():
        if isinstance(value, dict) and "GBps" in value:
            lines.append(_row(key, value["GBps"], d2h if "D2H" in key or "scatter" in key else h2d))
    for who, ref in (("writer", d2h), ("reader", h2d)):
        for key, value in result.get(who, {}).items():
            if key.endswith("GBps"):
                lines.append(_row(f"{who}.{key}", value, ref))
        for key, value in result.get(who, {}).items():
            if key.endswith("_s") and isinstance(value, list) and value:
                lines.append(f"{who}.{key:<52} median {1000 * statistics.median(value):7.2f} ms")
    stream = result.get("stream")
    if stream:
        lines.append(
            f"stream: {stream['layers']} layers x {stream['layer_bytes'] >> 20} MiB, reps {stream['reps']}: "
            f"all layers {1000 * stream['all_layers_after_last_commit_median_s']:.2f} ms after the last commit "
            f"(each: {[round(1000 * x, 2) for x in stream['all_layers_after_last_commit_s']]} ms); "
            f"one layer: put {1000 * stream['one_layer_put_s']:.2f} ms, leased get "
            f"{1000 * stream['one_layer_get_leased_s']:.2f} ms; write of all layers "
            f"{[round(1000 * x, 1) for x in stream['write_all_layers_s']]} ms"
        )
    return lines


def main() -> None:
    for path in sys.argv[1:]:
        with open(path) as f:
            print("\n".join(summarize(json.load(f))))


if __name__ == "__main__":
    main()
