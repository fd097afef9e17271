"""Disk-tier I/O through TierManager on the CPU: write-through and a disk hit of N pages of 2 MiB
(Llama-3.1-8B shape: 32 layers x K/V x 16 tokens x 8 kv heads x 128 dims, bf16).

    python scripts/bench_disk_tier_io.py [--pages 500] [--dir /tmp/x]

Prints the engine-thread time of the write-through step (apply), the time until the writes are on
disk, the raw read bandwidth of a fresh file of the same size in the same directory, and the disk hit's
read+verify (find) and copy-in (apply) times in GB/s -- both reads with the page cache dropped (unless
--warm-cache), so the hit is compared with the disk it reads. Files are removed at the end.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tierserve.bench.tiers_io import disk_bandwidth, drop_page_cache, resident_fraction
from tierserve.kv.prefix import hash_page
from tierserve.kv.tiers import io
from tierserve.kv.tiers.manager import TierManager

SHAPE = (32, 2, 16, 8, 128)
PS = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=500)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--warm-cache", action="store_true", help="read the pages from the page cache (no drop)")
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads (1: stable on a busy box)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    n = args.pages
    root = args.dir or tempfile.mkdtemp(prefix="tierserve-bench-")
    try:
        g = torch.Generator().manual_seed(0)
        src = torch.randn((n, *SHAPE), generator=g).to(torch.bfloat16)
        tokens = torch.randint(3, 30000, (n * PS,), generator=g).tolist()
        nbytes = src.numel() * src.element_size()
        tm = TierManager(SHAPE, torch.bfloat16, "bench", disk_dir=root, disk_bytes=1 << 40,
                         policy="always", prefetch=False)
        parent = None
        for i in range(n):
            toks = tuple(tokens[i * PS:(i + 1) * PS])
            parent = hash_page(parent, toks)
            tm.on_register(i, parent, toks)
        t0, c0 = time.perf_counter(), time.thread_time()
        tm.apply(tm.take_transfers(), src)
        t_apply, c_apply = time.perf_counter() - t0, time.thread_time() - c0
        tm.flush()
        t_disk = time.perf_counter() - t0
        print(f"write-through {n} pages ({nbytes / 1e9:.2f} GB): engine thread {t_apply * 1e3:.0f} ms "
              f"({t_apply / n * 1e3:.2f} ms/page; its CPU time {c_apply * 1e3:.0f} ms), on disk after {t_disk:.2f} s ({nbytes / t_disk / 1e9:.2f} GB/s)")

        raw = disk_bandwidth(root, nbytes, io.READ_WORKERS)
        print(f"raw read of a fresh {nbytes / 1e9:.2f} GB file: sequential {raw['disk_read_seq_GBps']:.2f} GB/s, "
              f"{io.READ_WORKERS} threads {raw['disk_read_parallel_GBps']:.2f} GB/s")
        files = sorted(Path(root).glob("*.kvp"))
        if not args.warm_cache:
            drop_page_cache(files)          # written back, then evicted: the hit reads the disk
        print(f"page cache holds {100 * (resident_fraction(files) or 0):.0f}% of the page files")
        fresh = TierManager(SHAPE, torch.bfloat16, "bench", disk_dir=root, disk_bytes=1 << 40,
                            policy="always", prefetch=False)
        dst = torch.zeros_like(src)
        t0, p0 = time.perf_counter(), time.process_time()
        hits = fresh.find(tokens, PS, 0, n, None)
        t_find = time.perf_counter() - t0
        assert len(hits) == n, len(hits)
        for pid, hit in enumerate(hits):
            fresh.schedule_onload(pid, hit)
        t1 = time.perf_counter()
        fresh.apply(fresh.take_transfers(), dst)
        t_load = time.perf_counter() - t1
        total, cpu = t_find + t_load, time.process_time() - p0
        assert torch.equal(dst.view(torch.int16), src.view(torch.int16))
        print(f"disk hit {n} pages: read+verify {t_find:.2f} s ({nbytes / t_find / 1e9:.2f} GB/s = "
              f"{nbytes / t_find / 1e9 / raw['disk_bandwidth_GBps']:.0%} of the raw read), "
              f"copy-in {t_load:.2f} s, total {total:.2f} s = {nbytes / total / 1e9:.2f} GB/s "
              f"(process CPU {cpu:.2f} s)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
