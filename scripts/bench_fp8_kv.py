"""FP8 vs BF16 KV attention kernels on the GPU (issue 6), at Llama-3.1-8B attention shapes (32 query heads,
8 KV heads, head_dim 128, 16-token pages, bf16). Prints a table (and writes JSON with ``--output``):

* decode: BF16 paged decode vs FP8 paged decode, batch 1 and 16, contexts 2k and 32k; FP8 with every
  page the read rule allows stored as FP8 ("stored") and with one old page per sequence not yet converted
  (quantised on the fly, as inside a multi-step window: "pending"). Split-K as the engine's CUDA graphs
  choose it for max_model_len = context + 144. Each call timed inside a CUDA graph of 32 calls (32 layers).
  FP8: the default configuration and the best of a small sweep (block_n, num_warps, num_stages, and
  rule_loads: loads by the read rule -- the default -- or by the stored flags).
* quantise: storing the pages that leave the full-precision window, all 32 layers: the Triton path the
  runner uses now vs the torch reference (``quantise_pages_``, the previous runner path), per call and
  amortised per decode step (batch B makes B/16 pages old per step).
* prefill: one 8192-token chunk over a 32k context (positions 24576..32767), BF16 paged prefill vs FP8
  paged prefill (context pages stored as FP8, the chunk's own pages at full precision, as in a chunked
  prefill); the FP8 time includes its scratch pass, also shown alone.

Run: ``python scripts/bench_fp8_kv.py [--output fp8_kv.json]``; ``--smoke`` runs tiny sizes (CPU:
TRITON_INTERPRET=1) to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from tierserve.bench.gpu_timer import cuda_or_interpreter

HQ, HKV, D, PAGE, LAYERS, SINK, RECENT = 32, 8, 128, 16, 32, 16, 64
# FP8 decode configurations tried (the first is the kernel's default)
CONFIGS = [dict(block_n=None, num_warps=None, num_stages=2)] + [
    dict(block_n=bn, num_warps=w, num_stages=st, rule_loads=rl)
    for bn in (32, 64) for w in (4, 8) for st in (2, 3) for rl in (True, False)] + [    # 128 spills (ptxas)
    # small blocks, few warps: the best on sparse steps at 2k selected tokens (fp8-sparse-decode-sweep-h200.json)
    dict(block_n=16, num_warps=w, num_stages=st) for w in (2, 4) for st in (1, 2)]
# FP8 prefill configurations tried (the first is the kernel's default: 128 rows, 32 keys, 8 warps)
PCONFIGS = [dict(), dict(block_n=64), dict(num_stages=3), dict(block_rows=64, num_warps=4)]
DECODE_LAYERS = 1   # --layers: the decode rows' pool holds this many layers, one per call in turn
ALL = False     # a row per decode configuration (--configs), not only the default and the best
OLD = None      # (decode, prefill) kernels before the rework, for comparison (scripts/fp8_kv_before.py)


def timer(fn, graph: bool, reps: int = 32) -> float:
    """Microseconds per call of ``fn``: ``reps`` calls in one CUDA graph on the GPU, one call on the CPU."""
    if graph:
        from tierserve.bench.gpu_timer import graph_time_us
        return graph_time_us(fn, reps=reps)
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def eager_timer(fn, cuda: bool, reps: int = 20) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e6 / reps


def pool(B: int, ctx: int, dev, dtype, layers: int = 1, extra: int = 0):
    """KV storage [N, layers, 2, PAGE, HKV, D] with disjoint random pages per sequence, page table [B, P]."""
    per = -(-(ctx + extra) // PAGE)
    N = B * per + 1
    data = torch.randn(N, layers, 2, PAGE, HKV, D, device=dev, dtype=dtype)
    table = torch.randperm(N - 1, device=dev)[:B * per].view(B, per)
    return data, table


def old_pages(table: torch.Tensor, ctx: int) -> list[int]:
    """Pages the policy lets be stored as FP8 once ``ctx`` tokens are computed (the query at ctx - 1)."""
    from tierserve.kv.fp8_pages import Fp8PagePolicy
    pol = Fp8PagePolicy(PAGE, SINK, RECENT)
    keep = [i for i in range(ctx // PAGE) if i * PAGE >= SINK and not pol.needs_full(i, ctx)]
    return table[:, keep].flatten().tolist()


def before(name: str, fn, graph: bool, base_us: float, reps: int = 32, **row) -> dict:
    """A row for the pre-rework kernel (scripts/fp8_kv_before.py) on the same inputs."""
    try:
        us = timer(fn, graph, reps=reps)
    except Exception as e:      # reported, not fatal
        return dict(setting=name, error=repr(e)[:80], **row)
    return dict(setting=name, us=us, speedup_vs_bf16=base_us / us, **row)


def decode_rows(B: int, ctx: int, dev, dtype, graph: bool, sms: int) -> list[dict]:
    from tierserve.attention.backend import choose_splits
    from tierserve.attention.fp8_decode_config import SPLITS, decode_config
    from tierserve.attention.triton_decode import paged_decode
    from tierserve.attention.triton_decode_fp8 import paged_decode_fp8
    from tierserve.attention.triton_fp8_quant import quantise_pages_triton

    data, table = pool(B, ctx, dev, dtype, layers=DECODE_LAYERS)
    turn = iter(range(1 << 62))

    def kv():       # each call reads the next layer (DECODE_LAYERS > 1: from HBM, as in a decode step, not L2)
        return data[:, next(turn) % DECODE_LAYERS]
    seq = torch.full((B,), ctx, device=dev)
    q = torch.randn(B, HQ, D, device=dev, dtype=dtype)
    splits = choose_splits(B, HKV, ctx + 144, sms)
    # the engine's FP8 setting of a dense decode step (runner/cuda_graphs.decode_splits, fp8_decode_config)
    engine = {"num_splits": choose_splits(B, HKV, ctx + 144, sms, **SPLITS), **decode_config(False, False, PAGE)}
    scale = D ** -0.5
    flags = torch.zeros(data.shape[0], dtype=torch.bool, device=dev)
    rows = []
    bf16_bytes = B * ctx * HKV * D * 2 * data.element_size()
    us = timer(lambda: paged_decode(q, *kv().unbind(1), table, seq, scale, num_splits=splits), graph)
    rows.append(dict(kernel="decode", setting="bf16", batch=B, context=ctx, splits=splits, us=us,
                     GBps=bf16_bytes / us / 1e3))
    old = old_pages(table, ctx)
    pending = table[:, (ctx - RECENT) // PAGE - 2].tolist()           # an old page per sequence, not stored yet
    stored = [p for p in old if p not in set(pending)]
    quantise_pages_triton(data, torch.tensor(stored, device=dev), PAGE)
    flags[torch.tensor(stored, device=dev)] = True
    n_fp8 = len(stored) * PAGE
    fp8_bytes = (B * ctx - n_fp8) * HKV * D * 2 * data.element_size() + n_fp8 * HKV * (D + 4) * 2
    for name, ids in (("fp8 pending", []), ("fp8 stored", pending)):
        if ids:
            quantise_pages_triton(data, torch.tensor(ids, device=dev), PAGE)
            flags[torch.tensor(ids, device=dev)] = True
        res = []
        for cfg in [engine] + CONFIGS:
            try:
                us = timer(lambda cfg=cfg: paged_decode_fp8(q, kv(), flags, table, seq, scale, PAGE, SINK, RECENT,
                                                            **{"num_splits": splits, **cfg}), graph)
                res.append((us, cfg))
            except Exception as e:      # a configuration that does not compile is reported, not fatal
                print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
        if not res:
            rows.append(dict(kernel="decode", setting=name, batch=B, context=ctx, error="no config compiled"))
            continue
        picks = [(label, r) for label, cfg in (("engine default", engine), ("kernel default", CONFIGS[0]))
                 for r in res[:2] if r[1] is cfg]
        every = [(f"#{i}", r) for i, r in enumerate(res[2:], 1)] if ALL else []
        for label, (us, cfg) in picks + every + [("best", min(res, key=lambda r: r[0]))]:
            rows.append(dict(kernel="decode", setting=f"{name} ({label})", batch=B, context=ctx, splits=splits,
                             config=",".join(f"{k}={v}" for k, v in cfg.items()), us=us, GBps=fp8_bytes / us / 1e3,
                             speedup_vs_bf16=rows[0]["us"] / us))
        if OLD is not None:     # the older kernel with its defaults, and with the best setting here (if it has it)
            best = {k: v for k, v in min(res, key=lambda r: r[0])[1].items() if k != "fast"}
            for label, cfg in (("", {}), (" at the best setting", best)):
                row = before(f"{name} (before{label})", lambda cfg=cfg: OLD[0](
                    q, kv(), flags, table, seq, scale, PAGE, SINK, RECENT, **{"num_splits": splits, **cfg}), graph,
                    rows[0]["us"], kernel="decode", batch=B, context=ctx, splits=splits)
                rows.append({**row, "config": ",".join(f"{k}={v}" for k, v in cfg.items())})
    return rows


def compact_rows(B: int, ctx: int, dev, dtype, graph: bool, sms: int) -> list[dict]:
    """The engine's dense FP8 setting with the old pages moved to compact slots (``kv_fp8_storage`` compact, the
    engine's default where memory allows; the rows above store them in place): same context, same pool layers,
    the BF16 kernel on the full-precision copy in the same run."""
    from tierserve.attention.backend import choose_splits
    from tierserve.attention.fp8_decode_config import SPLITS, decode_config
    from tierserve.attention.triton_decode import paged_decode
    from tierserve.attention.triton_decode_fp8 import paged_decode_fp8
    from tierserve.quant.fp8_compact import new_compact_pool
    from tierserve.runner.kv_fp8 import Fp8Pages

    data, table = pool(B, ctx, dev, dtype, layers=DECODE_LAYERS)
    seq = torch.full((B,), ctx, device=dev)
    q = torch.randn(B, HQ, D, device=dev, dtype=dtype)
    scale, N = D ** -0.5, data.shape[0]
    bf16_splits = choose_splits(B, HKV, ctx + 144, sms)
    turn = iter(range(1 << 62))

    def layer():
        return next(turn) % DECODE_LAYERS
    us_bf16 = timer(lambda: paged_decode(q, *data[:, layer()].unbind(1), table, seq, scale, num_splits=bf16_splits),
                    graph)
    old = old_pages(table, ctx)
    f = Fp8Pages(N, PAGE, SINK, RECENT, dev, compact=new_compact_pool(len(old) + 1, DECODE_LAYERS, PAGE, HKV, D, 0,
                                                                      dtype, dev))
    slots = {p: N + 1 + j for j, p in enumerate(old)}
    f.quantise(data, list(slots.items()))
    ctable = table.clone().cpu().apply_(lambda x: slots.get(x, x)).to(dev)
    engine = {"num_splits": choose_splits(B, HKV, ctx + 144, sms, **SPLITS), **decode_config(False, False, PAGE)}

    def fp8():
        i = layer()
        return paged_decode_fp8(q, data[:, i], f.quantised, ctable, seq, scale, PAGE, SINK, RECENT,
                                compact=f.kernel_pool(i), **engine)
    us = timer(fp8, graph)
    return [dict(kernel="decode", setting="bf16 (compact run)", batch=B, context=ctx, splits=bf16_splits, us=us_bf16),
            dict(kernel="decode", setting="fp8 compact (engine default)", batch=B, context=ctx,
                 config=",".join(f"{k}={v}" for k, v in engine.items()), us=us, speedup_vs_bf16=us_bf16 / us)]


def quantise_rows(B: int, dev, dtype, cuda: bool) -> list[dict]:
    from tierserve.attention.triton_fp8_quant import quantise_pages_triton
    from tierserve.quant.fp8_kv import quantise_pages_
    from tierserve.runner.kv_fp8 import Fp8Pages

    data = torch.randn(2 * B + 2, LAYERS, 2, PAGE, HKV, D, device=dev, dtype=dtype)
    ids = torch.arange(B, device=dev)
    rows = []
    for name, fn in (("triton (now)", lambda: quantise_pages_triton(data, ids, PAGE)),
                     ("torch quantise_pages_ (before)", lambda: quantise_pages_(data, ids, PAGE))):
        us = eager_timer(fn, cuda)
        rows.append(dict(kernel="quantise", setting=name, batch=B, pages=B, layers=LAYERS, us=us,
                         us_per_decode_step=us / PAGE))

    fp8 = Fp8Pages(data.shape[0], PAGE, SINK, RECENT, dev)

    def runner_call():          # host time of the runner's call (page ids uploaded, no host sync)
        fp8.quantised.zero_()
        t = time.perf_counter()
        fp8.quantise(data, list(range(B)))
        return time.perf_counter() - t
    runner_call()
    host = sorted(runner_call() for _ in range(9))[4] * 1e6
    rows.append(dict(kernel="quantise", setting="Fp8Pages.quantise host time", batch=B, pages=B, us=host))
    return rows


def prefill_rows(ctx: int, chunk: int, dev, dtype, graph: bool) -> list[dict]:
    from tierserve.attention.triton_fp8_quant import (
        prefill_scratch,
        quantise_pages_triton,
    )
    from tierserve.attention.triton_prefill import paged_prefill
    from tierserve.attention.triton_prefill_fp8 import paged_prefill_fp8

    data, table = pool(1, ctx, dev, dtype)
    kv = data[:, 0]
    c0 = ctx - chunk
    q = torch.randn(chunk, HQ, D, device=dev, dtype=dtype)
    args = (torch.zeros(1, dtype=torch.int64, device=dev), torch.full((1,), chunk, device=dev),
            torch.full((1,), ctx, device=dev), chunk)
    scale = D ** -0.5
    flops = 4 * HQ * D * (chunk * c0 + chunk * (chunk + 1) / 2)
    rows = []
    us = timer(lambda: paged_prefill(q, kv[:, 0], kv[:, 1], table, *args, scale), graph, reps=4)
    rows.append(dict(kernel="prefill", setting="bf16", context=ctx, chunk=chunk, us=us, TFLOPs=flops / us / 1e6))
    flags = torch.zeros(data.shape[0], dtype=torch.bool, device=dev)
    stored = old_pages(table, c0)
    quantise_pages_triton(data, torch.tensor(stored, device=dev), PAGE)
    flags[torch.tensor(stored, device=dev)] = True
    for cfg in PCONFIGS:
        try:
            us = timer(lambda cfg=cfg: paged_prefill_fp8(q, kv, flags, table, *args, scale, PAGE, SINK, RECENT, **cfg),
                       graph, reps=4)
        except Exception as e:      # a configuration that does not compile is reported, not fatal
            rows.append(dict(kernel="prefill", setting="fp8", config=str(cfg), error=repr(e)[:80]))
            continue
        rows.append(dict(kernel="prefill", setting="fp8 (incl. scratch)", context=ctx, chunk=chunk,
                         config=",".join(f"{k}={v}" for k, v in cfg.items()) or "default", us=us,
                         TFLOPs=flops / us / 1e6, speedup_vs_bf16=rows[0]["us"] / us))
    if OLD is not None:
        rows.append(before("fp8 (before the rework)", lambda: OLD[1](q, kv, flags, table, *args, scale, PAGE, SINK,
                                                                      RECENT), graph, rows[0]["us"], reps=1,
                           kernel="prefill", context=ctx, chunk=chunk))
    us = timer(lambda: prefill_scratch(kv, flags, table, args[1], args[2], chunk, chunk, PAGE, RECENT), graph, reps=4)
    rows.append(dict(kernel="prefill", setting="fp8 scratch pass alone", context=ctx, chunk=chunk, us=us))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter) to check the script")
    ap.add_argument("--output", help="write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="time the default configurations only (no sweep)")
    ap.add_argument("--no-before", action="store_true", help="skip the pre-rework kernels (loaded from git)")
    ap.add_argument("--before-rev", default="0e24fc2", help="the commit whose FP8 kernels are timed as 'before'")
    ap.add_argument("--configs", help="FP8 decode settings to try instead of the sweep (after the default): "
                    "';'-separated attention/fp8_decode_config settings, e.g. 'block_n=16,num_warps=2,fast=1'")
    ap.add_argument("--decode-only", action="store_true", help="only the decode rows (no quantise / prefill)")
    ap.add_argument("--compact", action="store_true", help="decode rows: also the engine default with the old "
                    "pages in compact slots (the engine's storage where memory allows)")
    ap.add_argument("--cases", help="decode rows: BATCHxCONTEXT,... (default 1x2048,1x32768,16x2048,16x32768)")
    ap.add_argument("--layers", type=int, default=1, help="decode rows: a pool of this many layers, each call on "
                    "the next (32: every read from HBM as in a decode step; 1: the same layer, L2-resident at 2k)")
    a = ap.parse_args()
    cuda = cuda_or_interpreter(a.smoke)
    global HQ, HKV, D, LAYERS, CONFIGS, PCONFIGS, OLD, ALL, DECODE_LAYERS
    DECODE_LAYERS = a.layers
    if a.smoke:
        HQ, HKV, D, LAYERS, CONFIGS, PCONFIGS = 4, 2, 16, 2, CONFIGS[:2], PCONFIGS[:1]
    if a.quick:
        CONFIGS, PCONFIGS = CONFIGS[:1], PCONFIGS[:1]
    if a.configs:
        from tierserve.attention.fp8_decode_config import parse
        CONFIGS = CONFIGS[:1] + [parse(t, "--configs") for t in a.configs.split(";") if t.strip()]
        ALL = True
    if not a.no_before:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from fp8_kv_before import load
        OLD = load(a.before_rev)
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 132
    decode = [(1, 2048), (1, 32768), (16, 2048), (16, 32768)] if not a.smoke else [(1, 200), (2, 130)]
    if a.cases:
        decode = [tuple(int(x) for x in c.split("x")) for c in a.cases.split(",")]
    rows = []
    for B, ctx in decode:
        rows += decode_rows(B, ctx, dev, dtype, cuda, sms)
        if a.compact:
            rows += compact_rows(B, ctx, dev, dtype, cuda, sms)
        torch.cuda.empty_cache() if cuda else None
    for B in ((1, 16) if not a.smoke else (2,)) if not a.decode_only else ():
        rows += quantise_rows(B, dev, dtype, cuda)
    if not a.decode_only:
        rows += prefill_rows(*((32768, 8192) if not a.smoke else (200, 64)), dev, dtype, cuda)
    keys = ["kernel", "setting", "batch", "context", "chunk", "splits", "config", "us", "GBps", "TFLOPs",
            "speedup_vs_bf16", "us_per_decode_step", "error"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.2f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))
    if a.output:
        meta = dict(device=torch.cuda.get_device_name(dev) if cuda else "cpu", torch=torch.__version__,
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    shapes=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, page=PAGE, keep_sink=SINK, keep_recent=RECENT))
        with open(a.output, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
