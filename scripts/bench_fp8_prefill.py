"""FP8 KV prefill on the GPU: flash over gathered readings (``attention/fp8_flash_prefill.py``, the default on CUDA
since stop 21) against the Triton FP8 prefill kernel (``triton_prefill_fp8.py``), with both BF16 baselines (the
engine's flash chunk attention over the gathered context, and the BF16 paged prefill kernel), in the same run. One
layer, one chunk of CHUNK tokens at the end of a CONTEXT-token sequence, context pages stored in FP8 as the page
policy allows, Llama-3.1-8B attention shapes (32 / 8 heads, head_dim 128, 16-token pages, keep_sink 16,
keep_recent 64), bf16. Eager timing (the flash path syncs once per call), median of ``--reps``, after a warm-up;
each FP8 output is compared with the kernel's.

  PYTHONPATH=. python scripts/bench_fp8_prefill.py [--cases 2048x2048,32768x8192,131072x8192] [--output FILE]
  PYTHONPATH=. python scripts/bench_fp8_prefill.py --sparse-cases 32768x8192,131072x8192 --cases ""   (sparse)
  PYTHONPATH=. python scripts/bench_fp8_prefill.py --smoke          (CPU interpreter, tiny: checks the script)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fp8_kv as kvb  # noqa: E402

from tierserve.bench.gpu_timer import cuda_or_interpreter  # noqa: E402


def median_ms(fn, cuda: bool, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def store_old_pages(data: torch.Tensor, table: torch.Tensor, c0: int, dev) -> torch.Tensor:
    """Quantise in place the pages the page policy lets be FP8 at context ``c0``; their ``quantised`` flags."""
    from tierserve.attention.triton_fp8_quant import quantise_pages_triton
    flags = torch.zeros(data.shape[0], dtype=torch.bool, device=dev)
    stored = kvb.old_pages(table, c0)
    if stored:
        ids = torch.tensor(stored, device=dev)
        quantise_pages_triton(data, ids, kvb.PAGE)
        flags[ids] = True
    return flags


def rows_for(ctx: int, chunk: int, dev, dtype, cuda: bool, reps: int, slices: list[int]) -> list[dict]:
    from tierserve.attention.flash_prefix import chunk_attention, gather_context
    from tierserve.attention.fp8_flash_prefill import fp8_chunk_attention
    from tierserve.attention.triton_prefill import paged_prefill
    from tierserve.attention.triton_prefill_fp8 import paged_prefill_fp8

    data, table = kvb.pool(1, ctx, dev, dtype)
    kv = data[:, 0]
    c0 = ctx - chunk
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(chunk, kvb.HQ, kvb.D, device=dev, dtype=dtype, generator=g)
    k = kv[table[0, c0 // kvb.PAGE:].tolist(), 0].reshape(-1, kvb.HKV, kvb.D)[:chunk]
    v = kv[table[0, c0 // kvb.PAGE:].tolist(), 1].reshape(-1, kvb.HKV, kvb.D)[:chunk]
    args = (torch.zeros(1, dtype=torch.int64, device=dev), torch.full((1,), chunk, device=dev),
            torch.full((1,), ctx, device=dev), chunk)
    scale = kvb.D ** -0.5
    flops = 4 * kvb.HQ * kvb.D * (chunk * c0 + chunk * (chunk + 1) / 2)
    base = dict(context=ctx, chunk=chunk)
    rows = []

    def row(setting: str, fn) -> None:
        ms = median_ms(fn, cuda, reps)
        rows.append(dict(setting=setting, ms=ms, TFLOPs=flops / ms / 1e9, **base))

    def bf16_flash():
        ctx_kv = gather_context(kv[:, 0], kv[:, 1], table[0], c0) if c0 else (None, None)
        return chunk_attention(q, k, v, *ctx_kv, scale)

    row("bf16 flash (gather + 2 flash calls: the engine's bf16 path)", bf16_flash)
    row("bf16 paged prefill kernel", lambda: paged_prefill(q, kv[:, 0], kv[:, 1], table, *args, scale))
    flags = store_old_pages(data, table, c0, dev)
    kern = paged_prefill_fp8(q, kv, flags, table, *args, scale, kvb.PAGE, kvb.SINK, kvb.RECENT)
    flash = fp8_chunk_attention(q, kv, flags, table[0], c0, scale, kvb.PAGE, kvb.SINK, kvb.RECENT)
    diff = float((flash.float() - kern.float()).abs().max() / kern.float().abs().max())
    row("fp8 Triton prefill kernel", lambda: paged_prefill_fp8(q, kv, flags, table, *args, scale, kvb.PAGE,
                                                               kvb.SINK, kvb.RECENT))
    row("fp8 flash over readings (default past MIN_WORK)", lambda: fp8_chunk_attention(q, kv, flags, table[0], c0, scale,
                                                                        kvb.PAGE, kvb.SINK, kvb.RECENT))
    rows[-1]["max_rel_diff_vs_kernel"] = diff
    for sl in slices:           # query rows per slice (TIERSERVE_FP8_FLASH_SLICE)
        row(f"fp8 flash over readings, slices of {sl}",
            lambda sl=sl: fp8_chunk_attention(q, kv, flags, table[0], c0, scale, kvb.PAGE, kvb.SINK, kvb.RECENT,
                                              slice_rows=sl))
    for r in rows:
        r["speedup_vs_bf16_flash"] = rows[0]["ms"] / r["ms"]
    return rows


def sparse_rows_for(ctx: int, chunk: int, dev, dtype, cuda: bool, reps: int, cfg) -> list[dict]:
    """Sparse prefill (``cfg``: top-k pages per 64-query block) of the same chunk: BF16 pages through
    ``sparse_chunk_attention`` and FP8 pages through ``sparse_fp8_chunk_attention`` (stop 24), against the dense FP8
    flash path over the same pages, in the same run. Pages carry their key min / max summary row."""
    from tierserve.attention.fp8_flash_prefill import fp8_chunk_attention
    from tierserve.attention.sparse_fp8_prefill import sparse_fp8_chunk_attention
    from tierserve.attention.sparse_prefill import sparse_chunk_attention, sparse_context

    data, table = kvb.pool(1, ctx, dev, dtype)
    summ = torch.stack([data[:, :, 0].amin(2), data[:, :, 0].amax(2)], dim=2)[:, :, :, None]   # [N, 1, 2, 1, H, D]
    data = torch.cat([data, summ], dim=3)
    kv = data[:, 0]
    c0 = ctx - chunk
    assert sparse_context(c0, kvb.PAGE, cfg), "the chunk's context must be past the sparse budget"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(chunk, kvb.HQ, kvb.D, device=dev, dtype=dtype, generator=g)
    own = kv[table[0, c0 // kvb.PAGE:].tolist(), :, :kvb.PAGE]                   # [n, 2, page, H, D]
    k, v = (own[:, i].reshape(-1, kvb.HKV, kvb.D)[:chunk] for i in (0, 1))
    scale = kvb.D ** -0.5
    base = dict(context=ctx, chunk=chunk, topk_tokens=cfg.topk_tokens)
    rows = []

    def row(setting: str, fn) -> None:
        rows.append(dict(setting=setting, ms=median_ms(fn, cuda, reps), **base))

    row("bf16 sparse prefill (sparse_chunk_attention)",
        lambda: sparse_chunk_attention(q, k, v, kv, table[0], c0, scale, cfg, kvb.PAGE))
    flags = store_old_pages(data, table, c0, dev)
    row("fp8 dense flash over readings (fp8_chunk_attention)",
        lambda: fp8_chunk_attention(q, kv, flags, table[0], c0, scale, kvb.PAGE, kvb.SINK, kvb.RECENT))
    row("fp8 sparse prefill (sparse_fp8_chunk_attention)",
        lambda: sparse_fp8_chunk_attention(q, kv, flags, table[0], c0, scale, kvb.PAGE, cfg, kvb.SINK, kvb.RECENT))
    for r in rows:
        r["speedup_vs_fp8_dense"] = rows[1]["ms"] / r["ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--cases", default="2048x2048,32768x8192,131072x8192", help="CONTEXTxCHUNK,...")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--slices", default="256,1024", help="other slice sizes of the flash path to time (default 512)")
    ap.add_argument("--sparse-cases", default="", help="CONTEXTxCHUNK,... also timed with sparse prefill "
                    "(top --topk tokens): bf16 and FP8 pages, against the dense FP8 path")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--output")
    a = ap.parse_args()
    cuda = cuda_or_interpreter(a.smoke)
    if a.smoke:
        kvb.HQ, kvb.HKV, kvb.D = 4, 2, 16
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cases = [tuple(int(x) for x in c.split("x")) for c in a.cases.split(",") if c] if not a.smoke else [(200, 64)]
    rows = []
    for ctx, chunk in cases:
        rows += rows_for(ctx, chunk, dev, dtype, cuda, a.reps if not a.smoke else 1,
                         [int(x) for x in a.slices.split(",") if x] if not a.smoke else [8])
        if cuda:
            torch.cuda.empty_cache()
    from tierserve.attention.select import SparseConfig
    scfg = SparseConfig("pages", 48, 16, 16) if a.smoke else SparseConfig("pages", a.topk)
    sparse = [tuple(int(x) for x in c.split("x")) for c in a.sparse_cases.split(",") if c] if not a.smoke \
        else [(200, 64)]
    for ctx, chunk in sparse:
        rows += sparse_rows_for(ctx, chunk, dev, dtype, cuda, a.reps if not a.smoke else 1, scfg)
        if cuda:
            torch.cuda.empty_cache()
    for r in rows:
        extra = f"  (max rel diff vs kernel {r['max_rel_diff_vs_kernel']:.2e})" if "max_rel_diff_vs_kernel" in r else ""
        rate = f"{r['TFLOPs']:7.1f} TFLOP/s x{r['speedup_vs_bf16_flash']:.2f}" if "TFLOPs" in r else \
            f"x{r['speedup_vs_fp8_dense']:.2f} vs the dense FP8 path"
        print(f"{r['context']:>7} {r['chunk']:>5}  {r['setting']:<60} {r['ms']:9.2f} ms {rate}{extra}")
    if a.output:
        meta = dict(device=torch.cuda.get_device_name(dev) if cuda else "cpu", torch=torch.__version__,
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(a.output, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
