"""Time the page score kernel (attention/triton_select.py) over 32 layers in turn at 128k, batch 1, with the key
min / max summaries where the engine keeps them (an extra row of each page in the page-major pool: every page's
summary a separate 2 KB piece per K / V, pages ~4 MB apart) against summaries in one contiguous array per layer
([pages, 2, Hkv, D] or [pages, Hkv, 2, D]), with page tables in order (one long request's pages) and shuffled.
The same kernel reads every layout (through strided views); the scores are checked equal first.

  PYTHONPATH=. python scripts/bench_summary_layout.py [--pages 16,32] [--output FILE]
"""
from __future__ import annotations

import argparse
import json

import torch

from tierserve.attention.select import SparseConfig
from tierserve.attention.triton_select import page_scores
from tierserve.bench.gpu_timer import graph_time_us

HQ, HKV, D, LAYERS = 32, 8, 128, 32


def layouts(N: int, page: int, dev) -> dict:
    """name -> per-layer kv views [N, 2, page + 1, Hkv, D] whose row ``page`` holds the summaries (equal data)."""
    pool = torch.randn(N, LAYERS, 2, page + 1, HKV, D, device=dev, dtype=torch.bfloat16)
    summ = pool[:, :, :, page].transpose(0, 1).contiguous()                    # [L, N, 2, Hkv, D]
    inter = summ.transpose(2, 3).contiguous()                                  # [L, N, Hkv, 2, D]
    hd = HKV * D
    return {
        "pool rows": [pool[:, i] for i in range(LAYERS)],
        "contiguous [N,2,H,D]": [summ[i].as_strided((N, 2, page + 1, HKV, D), (2 * hd, hd, 0, D, 1))
                                 for i in range(LAYERS)],
        "contiguous [N,H,2,D]": [inter[i].as_strided((N, 2, page + 1, HKV, D), (2 * hd, D, 0, 2 * D, 1))
                                 for i in range(LAYERS)],
    }


def run(page: int, ctx: int, dev) -> list[dict]:
    P = ctx // page
    N = P + 1
    cfg = SparseConfig("pages", topk_tokens=2048)
    q = torch.randn(1, HQ, D, device=dev, dtype=torch.bfloat16)
    seq = torch.full((1,), ctx, device=dev, dtype=torch.int64)
    tables = {"in order": torch.arange(1, N, device=dev).view(1, P),
              "shuffled": (torch.randperm(N - 1, device=dev) + 1).view(1, P)}
    rows = []
    lay = layouts(N, page, dev)
    for tname, table in tables.items():
        ref = page_scores(q, lay["pool rows"][0], table, seq, page, cfg)
        for name, views in lay.items():
            assert torch.equal(page_scores(q, views[0], table, seq, page, cfg), ref), name
            for bp in (16, 64):
                turn = iter(range(1 << 62))
                us = graph_time_us(lambda: page_scores(q, views[next(turn) % LAYERS], table, seq, page, cfg,
                                                       block_p=bp), reps=LAYERS)
                mb = P * HKV * 2 * D * 2 / 1e6
                rows.append(dict(page=page, context=ctx, table=tname, layout=name, block_p=bp, us_per_layer=us,
                                 summary_MB_per_layer=mb, GBps=mb * 1e3 / us))
                print(f"page {page:2d} {tname:9s} {name:22s} block_p {bp:3d}: {us:6.2f} us a layer "
                      f"({mb * 1e3 / us:6.0f} GB/s)", flush=True)
    del lay
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", default="16,32")
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--output")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    rows = [r for p in a.pages.split(",") for r in run(int(p), a.ctx, torch.device("cuda"))]
    if a.output:
        with open(a.output, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
