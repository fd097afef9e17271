"""The CUDA-core row GEMV for FP8 weights (``quant/triton_fp8_gemv_rows.py``) against the tensor-core ``fp8_gemm``
(the engine's default) and bf16 cuBLAS, batch 1, Llama-3.1-8B decode shapes, in the same run (issue 6 target a:
FP8 weights + FP8 KV at 1.8x bf16; stop 19: FP8 weights alone 1.09x). Each timing is a CUDA graph of 16 calls,
each on its own copy of the weights (the copies together exceed the 50 MB L2: every byte comes from HBM), median
of 7 replays. The row kernel is swept over tile rows and columns, warps and split-K waves; each configuration's
output is compared with ``fp8_gemm``'s (``--sweep``; stop 20 ran it). Always: the default tile (``row_tile``) with
split-K summed by a second reduce kernel and in the same launch (``fused_reduce``), bit-compared (the next-tile
and L2 prefetch variants timed in stops 21-22 were removed in stop 23).
``--smoke``: tiny shapes on the CPU interpreter (checks the script).

  PYTHONPATH=. python scripts/bench_fp8_gemv_rows.py --output $OUT/fp8-gemv-rows-h200.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from tierserve.bench.gpu_timer import cuda_or_interpreter  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GRID = list(itertools.product((32, 16, 64), (512, 256, 128), (4, 8), (4, 8)))   # block_n, block_k, warps, waves


def rotating(fn, copies: int):
    """``fn(i)`` for the next copy at each call."""
    state = {"i": 0}

    def one():
        fn(state["i"] % copies)
        state["i"] += 1
    return one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--output")
    ap.add_argument("--budget-s", type=float, default=200.0, help="seconds of sweep in all")
    ap.add_argument("--sweep", action="store_true", help="also sweep the tile settings")
    a = ap.parse_args()
    cuda = cuda_or_interpreter(a.smoke)
    from tierserve.quant.fp8 import quantize_fp8_blockwise
    from tierserve.quant.triton_fp8_gemv import fp8_gemm
    from tierserve.quant.triton_fp8_gemv_rows import fp8_gemv_rows

    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SHAPES if not a.smoke else {"tiny": (96, 256)}
    grid = GRID if not a.smoke else GRID[:2]
    if cuda:
        from tierserve.bench.gpu_timer import graph_time_us as timer
    else:
        def timer(fn, reps=1):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
    stop = time.perf_counter() + a.budget_s
    rows = []
    for layer, (N, K) in shapes.items():
        copies = max(2, -(-256 * 2**20 // (N * K))) if cuda else 2
        w = [torch.randn(N, K, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
        q = [quantize_fp8_blockwise(t) for t in w]
        x = torch.randn(1, K, device=dev, dtype=dtype)
        row = dict(layer=layer, N=N, K=K, copies=copies, fp8_MB=N * K / 1e6)
        row["cublas_bf16_us"] = timer(rotating(lambda i: F.linear(x, w[i]), copies))
        row["fp8_gemm_us"] = timer(rotating(lambda i: fp8_gemm(x, *q[i]), copies))
        want = fp8_gemm(x, *q[0]).float()
        variants = {"two_kernel": dict(fused_reduce=False), "fused": dict(fused_reduce=True)}
        base = fp8_gemv_rows(x, *q[0], fused_reduce=False)
        for name, kw in variants.items():
            row[f"rows_default_{name}_us"] = timer(rotating(lambda i, kw=kw: fp8_gemv_rows(x, *q[i], **kw), copies))
            row[f"{name}_same_bits"] = bool(torch.equal(fp8_gemv_rows(x, *q[0], **kw), base))
        best = None
        for bn, bk, nw, waves in grid if a.sweep else []:
            if time.perf_counter() > stop:
                break
            cfg = dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=1, waves=waves)
            try:
                us = timer(rotating(lambda i, cfg=cfg: fp8_gemv_rows(x, *q[i], **cfg), copies))
                err = ((fp8_gemv_rows(x, *q[0], **cfg).float() - want).abs().max() / want.abs().max()).item()
            except Exception as e:         # a configuration that does not compile is reported, not fatal
                print(f"  {layer} {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            row.setdefault("rows_sweep", []).append(dict(cfg, us=us, rel_err_vs_fp8_gemm=err))
            if best is None or us < best[0]:
                best = (us, cfg, err)
        if best:
            row.update(rows_best_us=best[0], rows_best_cfg=best[1], rows_rel_err_vs_fp8_gemm=best[2])
        for k in ("cublas_bf16", "fp8_gemm", "rows_best", *(f"rows_default_{v}" for v in variants)):
            if f"{k}_us" in row:
                nbytes = N * K * (2 if k == "cublas_bf16" else 1)
                row[f"{k}_TBps"] = nbytes / row[f"{k}_us"] / 1e6
        rows.append(row)
        w = q = None
        if cuda:
            torch.cuda.empty_cache()
        print(f"{layer}: bf16 {row['cublas_bf16_us']:.1f} us, fp8_gemm {row['fp8_gemm_us']:.1f} us, rows default "
              f"{row['rows_default_two_kernel_us']:.1f} (two kernels) / {row['rows_default_fused_us']:.1f} us (fused "
              f"reduce) a row; same bits: "
              f"{all(row[f'{v}_same_bits'] for v in variants)}; best of sweep "
              f"{row.get('rows_best_us', float('nan')):.1f} us {row.get('rows_best_cfg')}", flush=True)
    per_layer = {k: sum(r[f"{k}_us"] for r in rows if f"{k}_us" in r)
                 for k in ("cublas_bf16", "fp8_gemm", "rows_best", "rows_default_two_kernel", "rows_default_fused")}
    print("per transformer layer (us):", {k: round(v, 1) for k, v in per_layer.items()})
    if a.output:
        meta = dict(device=torch.cuda.get_device_name(dev) if cuda else "cpu", torch=torch.__version__,
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), env={k: v for k, v in os.environ.items()
                                                                                 if k.startswith("TIERSERVE_")})
        with open(a.output, "w") as f:
            json.dump({"meta": meta, "rows": rows, "per_layer_us": per_layer}, f, indent=1)


if __name__ == "__main__":
    main()
