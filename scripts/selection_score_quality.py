"""CPU check for issue 6 (b): can another page score from the same key min / max rows keep larger pages within the
2% perplexity budget?

Section b decodes faster with larger pages (cheaper selection: 64-token pages 2.07x, 32-token 2.26x, 16-token 1.93x
on the H200), but on tierserve-nano the sparse perplexity loss at 25% of a 1k context grows with the page: +1.69% /
+1.96% / +3.06% at 16 / 32 / 64 tokens (stop 25). The "pages" selector ranks pages by Quest's upper bound
q.c + |q|.r (c, r: each channel's midpoint and half range), whose spread term grows with the page. Here the ranking
is q.c + lam |q|.r for several lam (lam = 1: the bound; lam = 0: the midpoint key's score) and, per KV-head group,
the maximum or the sum over the group's query heads -- formulas the score kernel computes from the same two rows at
the same cost. ``tierserve eval ppl`` as in stop 25 (nano-heldout, 60 kB, context 1023, stride 512, 32-token chunks,
top-256 = 25%), the ranking patched into the torch reference the CPU path runs.

    PYTHONPATH=. python scripts/selection_score_quality.py [--pages 16,32,64] [--lams 1,0.5,0.25,0] [--max-bytes N]
        [--output F]
"""
from __future__ import annotations

import argparse
import json

import torch

from tierserve.attention import select, sparse_prefill, torch_ref


def make_score(lam: float, agg: str):
    def score(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, spread: float = 1.0) -> torch.Tensor:
        B, hq, nq, d = q.shape
        hkv = kmin.shape[1]
        qg = q.float().reshape(B, hkv, hq // hkv * nq, d)
        c, r = (kmax.float() + kmin.float()) / 2, (kmax.float() - kmin.float()) / 2
        s = qg @ c.transpose(-1, -2) + lam * (qg.abs() @ r.transpose(-1, -2))
        s = s.view(B, hkv, hq // hkv, nq, -1)
        return s.amax(dim=2) if agg == "max" else s.sum(dim=2)
    return score


def run(page: int, out: str, max_bytes: int = 60000) -> dict:
    from tierserve.cli import app
    args = ["eval", "ppl", "--corpus", "nano-heldout", "--max-bytes", str(max_bytes), "--context", "1023",
            "--stride", "512",
            "--max-num-batched-tokens", "32", "--compare", "",
            f"page_size={page},sparse_attention=pages,sparse_topk_tokens=256", "--output", out]
    try:
        app(args, standalone_mode=False)
    except SystemExit:
        pass
    with open(out) as f:
        rows = json.load(f)["rows"]
    return {"dense_ppl": rows[0]["ppl"], "sparse_ppl": rows[1]["ppl"], "delta_ppl_pct": rows[1]["delta_ppl_pct"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default="16,32,64")
    ap.add_argument("--lams", default="1,0.5,0.25,0")
    ap.add_argument("--aggs", default="max,sum")
    ap.add_argument("--max-bytes", type=int, default=60000, help="held-out text scored (stop 25's setup: 60000)")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    real = select.page_upper_bounds
    rows = []
    for page in (int(p) for p in a.pages.split(",")):
        for agg in a.aggs.split(","):
            for lam in (float(v) for v in a.lams.split(",")):
                fn = real if (lam == 1.0 and agg == "max") else make_score(lam, agg)
                for mod in (select, sparse_prefill, torch_ref):
                    mod.page_upper_bounds = fn
                try:
                    r = {"page_size": page, "lam": lam, "agg": agg, **run(page, "/tmp/selscore.json", a.max_bytes)}
                finally:
                    for mod in (select, sparse_prefill, torch_ref):
                        mod.page_upper_bounds = real
                rows.append(r)
                print(json.dumps(r), flush=True)
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"meta": {"tool": "scripts/selection_score_quality.py", "model": "tierserve-nano",
                                "corpus": "nano-heldout", "max_bytes": a.max_bytes, "context": 1023, "stride": 512,
                                "chunk": 32, "topk_tokens": 256}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
