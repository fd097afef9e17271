"""KV capacity for one memory budget: model-dtype pages vs FP8 compact storage (issue 6 part 2).

    python scripts/kv_capacity.py [--gb 0.5] [--dtype bfloat16] [--max-num-seqs 16] [--model DIR]

Builds the engine on the CPU (embedded tierserve-nano by default) with ``gpu_kv_gb`` for both settings and
prints the pages / tokens that fit and the bytes the pools really allocate."""
from __future__ import annotations

import argparse

from tierserve import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=0.5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    kw = dict(device="cpu", dtype=a.dtype, gpu_kv_gb=a.gb, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=4096)
    rows = []
    for name, extra in (("model dtype", {}), ("fp8 compact", dict(kv_dtype="fp8", kv_fp8_storage="compact"))):
        r = LLM(a.model, **kw, **extra).engine.runner
        nbytes = r.kv.data.nbytes + (r.fp8.compact.nbytes if r.fp8 is not None and r.fp8.compact is not None else 0)
        rows.append((name, r.num_pages, r.num_compact_pages, r.kv_capacity_tokens, nbytes))
        del r
    base = rows[0][3]
    for name, full, comp, toks, nbytes in rows:
        print(f"{name:12s} full pages {full:7d}  compact {comp:7d}  tokens {toks:9d} "
              f"({toks / base:.2f}x)  pool {nbytes / 2**30:.3f} GiB  tokens/GiB {toks / (nbytes / 2**30):,.0f}")


if __name__ == "__main__":
    main()
