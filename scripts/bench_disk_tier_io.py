"""Disk-tier I/O through TierManager on the CPU: write-through and a disk hit of N pages of 2 MiB
(Llama-3.1-8B shape: 32 layers x K/V x 16 tokens x 8 kv heads x 128 dims, bf16).

    python scripts/bench_disk_tier_io.py [--pages 500] [--dir /tmp/x]
    python scripts/bench_disk_tier_io.py --cpu-hit [--pages 2048] [--chunk-tokens 2048]     (a GPU)

Prints the engine-thread time of the write-through step (apply), the time until the writes are on
disk, the raw read bandwidth of a fresh file of the same size in the same directory, and the disk hit's
read+verify (find) and copy-in (apply) times in GB/s -- both reads with the page cache dropped (unless
--warm-cache), so the hit is compared with the disk it reads. Files are removed at the end.

``--cpu-hit`` (CUDA): a CPU-RAM hit of N pages loaded into the GPU pool, with a stand-in forward pass of 32
layers (per layer the GEMMs of a Llama-3.1-8B layer on ``--chunk-tokens`` rows, reading the layer's KV view
through ``KVCache.layer``): the copies alone, the forward alone, the synchronous path (copies, then the
forward) and the overlapped one (kv/tiers/overlap.py: layer by layer on a side stream). Checks the pages
are bit-identical both ways. The engine's switch is TIERSERVE_KV_OVERLAP=0 (synchronous).
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
    ap.add_argument("--cpu-hit", action="store_true", help="CPU-RAM hit, overlapped vs synchronous (CUDA)")
    ap.add_argument("--chunk-tokens", type=int, default=2048, help="--cpu-hit: rows of the stand-in forward")
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads (1: stable on a busy box)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.cpu_hit:
        return cpu_hit(args.pages, args.chunk_tokens)
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


def cpu_hit(n: int, rows: int) -> None:
    from tierserve.kv.layout import KVCache, KVLayout

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layout = KVLayout(SHAPE[0], SHAPE[3], SHAPE[4], PS, torch.bfloat16)
    kv = KVCache(layout, n + 1, dev)
    tm = TierManager(SHAPE, torch.bfloat16, "bench", host_pages=n, policy="always", prefetch=False, device=dev)
    if not cuda:                                       # a dry run of this script: the deferred stand-in stream
        from tierserve.kv.tiers.overlap import DeferredStreams
        print("no CUDA device: a dry run with a stand-in side stream (the times mean nothing)")
        tm.streams = DeferredStreams()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 30000, (n * PS,), generator=g).tolist()
    entries, parent = [], None
    for i in range(n):
        parent = hash_page(parent, tuple(tokens[i * PS:(i + 1) * PS]))
        entries.append((parent, tuple(tokens[i * PS:(i + 1) * PS])))
    base = torch.randn((min(n, 256), *SHAPE), generator=g)
    for a in range(0, n, 256):                         # distinct pages into CPU RAM, 256 at a time
        m = len(entries[a:a + 256])
        tm.host.store_many(entries[a:a + m], (base[:m] * (1 + a / n)).to(torch.bfloat16), set())
    w = [torch.randn(k, m, device=dev, dtype=torch.bfloat16) / 64 for k, m in
         ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))]
    x = torch.randn(rows, 4096, device=dev, dtype=torch.bfloat16)

    def forward() -> None:                             # a Llama-3.1-8B layer's GEMMs per layer, reading its KV
        h = x
        for i in range(SHAPE[0]):
            h = h + kv.layer(i)[:1, 0, 0, 0, :1].float().sum() * 0
            h = (h @ w[0])[:, :4096] + (h @ w[1])
            h = (h @ w[2])[:, :14336] @ w[3] / 64
        kv.settle()

    def load(overlap_on: bool) -> float:
        kv.data.zero_()
        for pid, hit in enumerate(tm.find(tokens, PS, 0, n, None)):
            tm.schedule_onload(pid, hit)
        tm.overlap_loads = overlap_on
        sync()
        t0 = time.perf_counter()
        kv.loading = tm.apply(tm.take_transfers(), kv.data, overlap=True)
        forward()
        sync()
        dt = time.perf_counter() - t0
        tm.settle_loads()
        return dt

    def best(fn, reps: int = 3) -> float:
        return min(fn() for _ in range(reps))

    def fwd() -> float:
        sync()
        t0 = time.perf_counter()
        forward()
        sync()
        return time.perf_counter() - t0
    load(False), load(True), fwd()                     # warm-up: kernels, pinned staging, the side stream
    t_fwd = best(fwd)
    t_sync = best(lambda: load(False))
    want = kv.data[:n].cpu()
    copy_s = tm.last_onload["cpu"]["seconds"]
    t_over = best(lambda: load(True))
    same = torch.equal(kv.data[:n].cpu().view(torch.int16), want.view(torch.int16))
    nbytes = n * tm.page_bytes
    print(f"CPU-RAM hit of {n} pages ({nbytes / 1e9:.2f} GB), zero-copy {tm.zero_copy}: copies alone "
          f"{copy_s:.3f} s ({nbytes / copy_s / 1e9:.1f} GB/s), forward alone ({rows} rows x 32 layers) {t_fwd:.3f} s; "
          f"synchronous {t_sync:.3f} s, overlapped {t_over:.3f} s (side-stream copies "
          f"{tm.last_onload['cpu']['seconds']:.3f} s, overlap {tm.last_onload['cpu']['overlap']}), "
          f"ideal max {max(copy_s, t_fwd):.3f} s; pages identical: {same}")


if __name__ == "__main__":
    main()
