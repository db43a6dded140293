"""``kvstore bench --parts tiers``: the NVMe tier beside raw file I/O, and demotion throughput (issue 4).

* **NVMe tier I/O**: :class:`kvstore.tiers.nvme.NvmeRegion` writes and reads
  ``total`` bytes as segments of each size (4 MiB, 64 KiB) placed at shuffled
  slot offsets (so nothing coalesces: every segment is one request), from and
  into page-aligned host memory, with its I/O threads.  Beside it, in the same
  run, the same directory, the same sizes, offsets and O_DIRECT mode: raw
  ``pwrite``/``preadv`` of a plain file from the same number of threads, and
  from one thread.  With buffered I/O (no O_DIRECT) reads come from the page
  cache, and the numbers say so.
* **Demotion**: a one-node cluster (DRAM + NVMe in that directory) is filled
  to just under its high watermark, one more put tips it over, and the time
  until the master has demoted DRAM down to its low watermark gives pages/s
  and GB/s, end to end (master tick, node copy + checksum, placement switch).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvstore.config import format_size
from kvstore.testing import Cluster, prompt, wait_for
from kvstore.tiers.nvme import NvmeRegion, _address_view, _open_direct

SIZES = (4 << 20, 64 << 10)
THREADS = 4


def disk_of(directory: str) -> str:
    """What backs ``directory`` (findmnt: source, filesystem), for the report."""
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", directory],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    usage = shutil.disk_usage(directory)
    return f"{out or '?'} ({format_size(usage.free)} free of {format_size(usage.total)})"


def _raw_io(
    path: str, direct: bool, offsets: list[int], size: int, base: int, threads: int, write: bool
) -> float:
    """Seconds to pwrite/preadv every segment of ``size`` at ``offsets`` from/to memory at ``base``."""
    flags = os.O_RDWR | (getattr(os, "O_DIRECT", 0) if direct else 0)
    fd = os.open(path, flags)
    try:
        chunks = [list(range(i, len(offsets), threads)) for i in range(threads)]

        def work(indices: list[int]) -> None:
            for i in indices:
                view = _address_view(base + i * size, size)
                if write:
                    os.pwrite(fd, view, offsets[i])
                else:
                    os.preadv(fd, [view], offsets[i])

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, chunks))
        if write and not direct:
            os.fsync(fd)  # buffered writes count once they reach the disk, as O_DIRECT ones do
        return time.perf_counter() - start
    finally:
        os.close(fd)


def tier_io(directory: str, total: int, threads: int = THREADS) -> dict[str, Any]:
    """GB/s of the NVMe tier and of raw file I/O for each segment size."""
    region = NvmeRegion.create(directory, "bench", total, direct="auto", io_threads=threads)
    raw_path = os.path.join(directory, "kvstore-bench-raw.dat")
    rows: list[dict[str, Any]] = []
    buf = mmap.mmap(-1, total)
    try:
        with open(raw_path, "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, total)
        direct = region.direct
        if direct:
            probe_fd, ok, _ = _open_direct(raw_path)
            if ok:
                os.close(probe_fd)
            direct = ok
        mem = np.frombuffer(buf, dtype=np.uint8)
        mem[:] = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
        base = int(mem.ctypes.data)
        for size in SIZES:
            count = total // size
            offsets = [i * size for i in range(count)]
            random.Random(size).shuffle(offsets)
            slots = np.array(offsets, dtype=np.uint64)
            addresses = np.uint64(base) + np.arange(count, dtype=np.uint64) * np.uint64(size)
            lengths = np.full(count, size, dtype=np.uint64)
            start = time.perf_counter()
            region.write_from(slots, addresses, lengths)
            if not region.direct:
                os.fsync(region._fd)
            tier_write = time.perf_counter() - start
            start = time.perf_counter()
            region.read_into(slots, addresses, lengths)
            tier_read = time.perf_counter() - start
            raw = {
                (threads, True): _raw_io(raw_path, direct, offsets, size, base, threads, True),
                (threads, False): _raw_io(raw_path, direct, offsets, size, base, threads, False),
                (1, True): _raw_io(raw_path, direct, offsets, size, base, 1, True),
                (1, False): _raw_io(raw_path, direct, offsets, size, base, 1, False),
            }
            for op, tier_s, raw_n, raw_1 in (
                ("write", tier_write, raw[(threads, True)], raw[(1, True)]),
                ("read", tier_read, raw[(threads, False)], raw[(1, False)]),
            ):
                rows.append(
                    {
                        "size": size,
                        "op": op,
                        "tier_gbps": total / tier_s / 1e9,
                        "raw_gbps": total / raw_n / 1e9,
                        "raw_1thread_gbps": total / raw_1 / 1e9,
                    }
                )
        del mem
        return {
            "directory": directory,
            "disk": disk_of(directory),
            "direct": region.direct,
            "threads": threads,
            "bytes": total,
            "results": rows,
        }
    finally:
        region.close()
        buf.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(raw_path)


def demotion(directory: str, dram: int, layers: int = 4, segment: int = 256 << 10) -> dict[str, Any]:
    """Pages/s and GB/s of demoting a full DRAM region down to its low watermark."""
    slot = layers * segment
    high, low = 0.9, 0.1
    with Cluster(
        1,
        dram=dram,
        nvme=2 * dram,
        nvme_dir=directory,
        high_watermark=high,
        low_watermark=low,
        arena_bytes="16MiB",
        read_lease_ms=30_000,
        write_lease_ms=30_000,
        startup_timeout=120.0,
    ) as cluster:
        client = cluster.client("bench/tiers")
        page_size = 16
        client.create_namespace(page_size=page_size, num_layers=layers, segment_bytes=segment)
        pages_per_put = max(1, min(64, (64 << 20) // slot))
        kv = np.random.default_rng(1).integers(0, 256, (pages_per_put, segment), dtype=np.uint8)
        # fill to just under the high watermark, a put of up to pages_per_put pages at a time
        left = int(dram * (high - 0.05)) // slot
        seed = 0
        while left > 0:
            count = min(left, pages_per_put)
            tokens = prompt(10_000 + seed, count * page_size)
            for layer in range(layers):
                client.put_layer(tokens, layer, kv[:count])
            left -= count
            seed += 1

        def dram_usage() -> tuple[int, int]:
            for node in cluster.stats().nodes:
                for tier in node.tiers:
                    if tier.tier == "dram":
                        return tier.allocated_bytes, tier.demotions
            return 0, 0

        _, before = dram_usage()
        tip_pages = min(pages_per_put, int(dram * 0.1) // slot + 1)  # over the high watermark
        tip = prompt(99_999, tip_pages * page_size)
        tip_kv = kv[:tip_pages]
        start = time.perf_counter()
        for layer in range(layers):
            client.put_layer(tip, layer, tip_kv)
        wait_for(
            lambda: dram_usage()[0] <= low * dram + slot, 300.0, "DRAM to drain to its low watermark", 0.005
        )
        elapsed = time.perf_counter() - start
        _, after = dram_usage()
        pages = after - before
        return {
            "dram_bytes": dram,
            "slot_bytes": slot,
            "pages": pages,
            "seconds": elapsed,
            "pages_per_s": pages / elapsed if elapsed else 0.0,
            "gbps": pages * slot / elapsed / 1e9 if elapsed else 0.0,
        }


def run_tiers(directory: str | None, quick: bool) -> dict[str, Any]:
    """Both measurements; prints as it goes."""
    parent = directory or tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix="kvstore-bench-tiers-", dir=parent)
    try:
        total = (128 << 20) if quick else (1 << 30)
        io = tier_io(work, total)
        print(
            f"  tiers: {work} on {io['disk']}, {'O_DIRECT' if io['direct'] else 'buffered (page cache!)'}, "
            f"{io['threads']} threads, {format_size(total)} per run",
            flush=True,
        )
        for row in io["results"]:
            print(
                f"    nvme tier {format_size(row['size']):>9s} {row['op']:5s}: {row['tier_gbps']:.2f} GB/s; raw file "
                f"{row['raw_gbps']:.2f} GB/s ({io['threads']} threads), {row['raw_1thread_gbps']:.2f} GB/s (1 thread)",
                flush=True,
            )
        demo = demotion(work, (128 << 20) if quick else (512 << 20))
        print(
            f"    demotion: {demo['pages']} pages of {format_size(demo['slot_bytes'])} in {demo['seconds']:.2f} s: "
            f"{demo['pages_per_s']:.0f} pages/s, {demo['gbps']:.2f} GB/s",
            flush=True,
        )
        return {"io": io, "demotion": demo}
    finally:
        shutil.rmtree(work, ignore_errors=True)
