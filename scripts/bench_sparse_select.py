"""Time sparse "pages" selection per layer on the GPU: the PyTorch chain (page_upper_bounds -> select_pages ->
count_selection -> compact_selection) vs the fused Triton kernels (attention/triton_select.py), at Llama-8B
attention shapes (32 query heads, 8 KV heads, D=128, 16-token pages, 128k context = 8192 pages).

Each variant is timed eagerly and inside a CUDA graph of 32 calls (like 32 layers of one decode step);
before timing, the two selections are compared (same page sets, same decode output).

  python scripts/bench_sparse_select.py [--batch 1,4] [--ctx 131072] [--topk 2048] [--output FILE]
  TRITON_INTERPRET=1 python scripts/bench_sparse_select.py --smoke --batch 1,2 --ctx 300 --topk 96 --hq 4 \
      --hkv 2 --head-dim 16         (the checks only, on the CPU)
  python scripts/bench_sparse_select.py --ptxas   (no GPU: the kernels compiled for sm_90, registers and spills)
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from tierserve.attention import triton_select_topk, triton_select_two_level
from tierserve.attention.backend import AttnMetadata
from tierserve.attention.select import SparseConfig, selection_bound
from tierserve.attention.triton_backend import _select_pages
from tierserve.attention.triton_decode import paged_decode
from tierserve.attention.triton_select import page_scores
from tierserve.attention.triton_select_topk import topk_compact
from tierserve.attention.triton_select_two_level import group_size, topk_two_level


def build(B, ctx, page, hq, hkv, D, layers, topk, heat, dev, table_pages=0):
    pages = max(-(-ctx // page), table_pages)      # page-table width (the engine's covers max_model_len)
    N = B * pages + 1
    # page-major storage like the engine's: [N, layers, 2, page + 1 summary row, Hkv, D]; layer 0 is timed
    data = torch.randn(N, layers, 2, page + 1, hkv, D, device=dev, dtype=torch.bfloat16)
    kv = data[:, 0]
    kv[:, 0, page] = kv[:, 0, :page].amin(1)
    kv[:, 1, page] = kv[:, 0, :page].amax(1)
    table = torch.randperm(N - 1, device=dev)[:B * pages].view(B, pages) + 1
    seq = torch.full((B,), ctx, device=dev, dtype=torch.int64)
    q = torch.randn(B, hq, D, device=dev, dtype=torch.bfloat16)
    meta = AttnMetadata(num_seqs=B, num_tokens=B, page_size=page, positions=seq - 1, slot_pages=table[:, -1],
                        slot_offsets=(seq - 1) % page, query_start_loc=torch.arange(B + 1, device=dev),
                        seq_lens=seq, page_table=table, decode_only=True,
                        sparse=SparseConfig("pages", topk_tokens=topk),
                        page_heat=torch.zeros(N, device=dev) if heat else None)
    return q, kv, meta


def timed(fn, n=32, reps=7, graph=True):
    """Median microseconds per call of ``fn`` over ``n`` back-to-back calls (in one CUDA graph or eager)."""
    fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(n):
                fn()
    run()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record()
        run()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(ts)[reps // 2]


def select(q, kv, meta, mode):
    """mode: "torch" (the PyTorch chain), "fused" (one-level top-k: "search"), "fused two-level"; " sort": the
    two-level steps' cuts by a bitonic top-k (``TIERSERVE_TOPK_THRESHOLD=sort``)."""
    if mode == "torch":
        os.environ["TIERSERVE_SPARSE_SELECT"] = "torch"
    else:
        os.environ.pop("TIERSERVE_SPARSE_SELECT", None)
    default, cut = triton_select_topk.DEFAULT_METHOD, triton_select_two_level.THRESHOLD
    triton_select_topk.DEFAULT_METHOD = "two-level" if mode.startswith("fused two-level") else "search"
    triton_select_two_level.THRESHOLD = "sort" if mode.endswith(" sort") else "search"
    try:
        return _select_pages(q, kv, meta, 0, logical=True)
    finally:
        triton_select_topk.DEFAULT_METHOD, triton_select_two_level.THRESHOLD = default, cut


def check(q, kv, meta, mode="fused"):
    """Compare the fused (``mode``) and the torch selections: rows with the same page set, decode outputs."""
    heat = meta.page_heat
    meta.page_heat = heat.clone() if heat is not None else None
    want = select(q, kv, meta, "torch")
    want_heat, meta.page_heat = meta.page_heat, heat.clone() if heat is not None else None
    got = select(q, kv, meta, mode)
    same_rows = (want[1] == got[1]).all(-1).float().mean().item()
    page = meta.page_size
    outs = [paged_decode(q, kv[:, 0, :page], kv[:, 1, :page], t, n, 0.088, num_splits=1) for t, _, n in (want, got)]
    heat_ok = heat is None or torch.equal(want_heat, meta.page_heat)
    meta.page_heat = heat
    return {"rows_same_pages": round(same_rows, 4), "lens_equal": bool(torch.equal(want[2], got[2])),
            "heat_equal": heat_ok, "decode_max_abs_diff": (outs[0].float() - outs[1].float()).abs().max().item()}


def _stop21_group(P: int, bound: int) -> int:
    """Stop 21's group size (timed against): 4-page groups up to 16k pages, rows of 4096 or 8192 lanes, room for as
    many chosen groups as the output has slots."""
    k_pad = triton.next_power_of_2(min(P, bound))
    for row in (4096, 8192):
        g = max(4, triton.next_power_of_2(-(-P // row)))
        if k_pad * g <= 4096 and triton.next_power_of_2(-(-P // g)) <= 8192:
            return g
    return 0


def bench_batch(B, a, dev, table_pages):
    q, kv, meta = build(B, a.ctx, a.page, a.hq, a.hkv, a.head_dim, a.layers, a.topk, not a.no_heat, dev,
                        table_pages)
    cmp = check(q, kv, meta)
    cmp2 = {f"two_level_{k}": v for k, v in check(q, kv, meta, "fused two-level").items()}
    cmp.update(cmp2)
    cmp.update({f"two_level_sort_{k}": v for k, v in check(q, kv, meta, "fused two-level sort").items()})
    P = meta.page_table.shape[1]
    cfg = meta.sparse
    scores = page_scores(q, kv, meta.page_table, meta.seq_lens, a.page, cfg)
    G = group_size(P, selection_bound(cfg, a.page), cfg.topk_tokens // a.page)
    G_old = _stop21_group(P, selection_bound(cfg, a.page))
    variants = {
        "torch chain": lambda: select(q, kv, meta, "torch"),
        "fused": lambda: select(q, kv, meta, "fused"),
        "fused two-level": lambda: select(q, kv, meta, "fused two-level"),
        "fused two-level sort": lambda: select(q, kv, meta, "fused two-level sort"),
        "  score kernel": lambda: page_scores(q, kv, meta.page_table, meta.seq_lens, a.page, cfg),
        "  score kernel + groups": lambda: page_scores(q, kv, meta.page_table, meta.seq_lens, a.page, cfg,
                                                       group=G or 4),
        "  topk+compact": lambda: topk_compact(scores, meta.page_table, meta.seq_lens, a.page,
                                               cfg.topk_tokens // a.page, selection_bound(cfg, a.page),
                                               meta.page_heat, None, kv.shape[0]),
    }
    # the score kernel's launch: pages a program x warps (default 16 x 4; ptxas: --ptxas)
    for bp in (8, 16, 32, 64):
        for nw in (1, 2, 4, 8):
            if (bp, nw) != (16, 4):
                variants[f"  score kernel + groups bp{bp} {nw}w"] = lambda bp=bp, nw=nw: page_scores(
                    q, kv, meta.page_table, meta.seq_lens, a.page, cfg, group=G or 4, block_p=max(bp, G or 4),
                    num_warps=nw)
    if G:
        _, gscores = page_scores(q, kv, meta.page_table, meta.seq_lens, a.page, cfg, group=G)
        variants[f"  topk two-level g{G}"] = lambda: topk_two_level(
            scores, gscores, G, meta.page_table, meta.seq_lens, a.page, cfg.topk_tokens // a.page,
            selection_bound(cfg, a.page), meta.page_heat, None, kv.shape[0])
        # fewer warps: shorter block-wide reductions (the search is a chain of 32 of them); ptxas sm_90 at 8208
        # pages: 2 / 4 warps 194 / 134 registers, no spills (1 warp spills 24 bytes)
        for nw in (4, 8, 16):
            variants[f"  topk two-level g{G} sort {nw}w"] = lambda nw=nw: topk_two_level(
                scores, gscores, G, meta.page_table, meta.seq_lens, a.page, cfg.topk_tokens // a.page,
                selection_bound(cfg, a.page), meta.page_heat, None, kv.shape[0], num_warps=nw, threshold="sort")
        for nw in (1, 2, 4, 16):
            variants[f"  topk two-level g{G} {nw}w"] = lambda nw=nw: topk_two_level(
                scores, gscores, G, meta.page_table, meta.seq_lens, a.page, cfg.topk_tokens // a.page,
                selection_bound(cfg, a.page), meta.page_heat, None, kv.shape[0], num_warps=nw)
    if G_old:
        _, gscores_old = page_scores(q, kv, meta.page_table, meta.seq_lens, a.page, cfg, group=G_old)
        variants[f"  topk two-level g{G_old} (stop 21)"] = lambda: topk_two_level(
            scores, gscores_old, G_old, meta.page_table, meta.seq_lens, a.page, cfg.topk_tokens // a.page,
            selection_bound(cfg, a.page), meta.page_heat, None, kv.shape[0], capacity="loose")
    variants["  topk radix"] = lambda: topk_compact(scores, meta.page_table, meta.seq_lens, a.page,
                                                    cfg.topk_tokens // a.page, selection_bound(cfg, a.page),
                                                    meta.page_heat, None, kv.shape[0], method="radix")
    # the wide top-k kernel (default past MAX_BLOCK pages): the first ``reg`` pages in registers, the rest
    # streamed in chunks; reg 16 streams (almost) everything
    for reg, chunk, nw in ((8192, 2048, 16), (8192, 1024, 32), (16, 4096, 16)):
        variants[f"  topk reg {reg} chunk {chunk} {nw}w"] = lambda reg=reg, chunk=chunk, nw=nw: topk_compact(
            scores, meta.page_table, meta.seq_lens, a.page, cfg.topk_tokens // a.page, selection_bound(cfg, a.page),
            meta.page_heat, None, kv.shape[0], chunk=chunk, reg=reg, num_warps=nw)
    for bp, nw in ((16, 8), (32, 4), (32, 8), (64, 8)):        # the score kernel's alternatives (default 16, 4)
        variants[f"  score {bp}p {nw}w"] = lambda bp=bp, nw=nw: page_scores(q, kv, meta.page_table, meta.seq_lens,
                                                                             a.page, cfg, block_p=bp, num_warps=nw)
    if a.smoke:            # each variant once, untimed
        for fn in variants.values():
            fn()
        print(f"{B:>3} {P:>6} ran {len(variants)} variants; check: {cmp}")
        return [{"batch": B, "pages": P, "variant": "check", **cmp}]
    rows = []
    for name, fn in variants.items():
        eager, graph = timed(fn, graph=False), timed(fn, graph=True)
        rows.append({"batch": B, "pages": P, "variant": name.strip(), "eager_us": round(eager, 2),
                     "graph_us": round(graph, 2), "per_token_ms_32_layers": round(graph * 32 / 1e3, 3)})
        print(f"{B:>3} {P:>6} {name:<18} {eager:>9.1f} {graph:>9.1f} {graph * 32 / 1e3:>12.3f}", flush=True)
    rows.append({"batch": B, "pages": P, "variant": "check", **cmp})
    print(f"{B:>3} {P:>6} check: {cmp}", flush=True)
    return rows


def ptxas_report(a):
    """Compile the kernels for sm_90 without a GPU (Triton's bundled ptxas): registers and spills per config."""
    from sm90_compile import compile_sm90

    from tierserve.attention import triton_select, triton_select_topk, triton_select_two_level

    def build_one(fn, types, consts, warps, extra=None):
        sig = dict(zip(fn.arg_names[:len(types)], types, strict=True)) | (extra or {})
        info = compile_sm90(fn, sig, consts, warps)
        print(fn.__name__, consts, warps, "warps:", info)

    score_types = ["*bf16"] * 7 + ["*i64", "*i64", "*fp32"] + ["i32"] * 23
    groups = {"grp_ptr": "*fp32", "n_grp": "i32", "s_rb": "i32", "s_rh": "i32"}     # the two-level group scores
    for host, compact in ((False, False), (True, False), (False, True), (True, True)):
        for bp, nw, grp in ((16, 4, 0), (16, 8, 0), (32, 4, 0), (32, 8, 0), (64, 8, 0), (16, 4, 4)):
            build_one(triton_select._page_score_kernel, score_types,
                      dict(GROUP=a.hq // a.hkv, HEAD_DIM=a.head_dim, D_PAD=a.head_dim, PAGE=a.page, BLOCK_P=bp,
                           TOPK=a.topk, SINK=16, RECENT=64, HOST=host, COMPACT=compact, PAGE_GROUP=grp), nw, groups)
    topk_types = ["*fp32", "*i64", "*i64", "*i64", "*i64", "*i64", "*fp32", "*fp32"] + ["i32"] * 11
    common = dict(K_OUT=135, K_PAD=256, BUDGET=a.topk // a.page, PAGE=a.page, HEAT=True, HOST_HEAT=True)
    for block in (8192, 16384):
        for radix in (False, True):
            build_one(triton_select_topk._topk_kernel, topk_types, common | {"BLOCK": block, "RADIX": radix}, 16)
    for reg, chunk, nw in ((8192, 2048, 16), (8192, 1024, 32), (16, 4096, 16)):
        build_one(triton_select_topk._topk_wide_kernel, topk_types, common | {"CHUNK": chunk, "REG": reg}, nw)
    two_types = ["*fp32", "*fp32", "*i32", "*i64", "*i64", "*i64", "*i64", "*i64", "*fp32", "*fp32"] + ["i32"] * 16
    # 128k + new tokens (8208 pages), 1M + new tokens, and the stop-21 shapes (loose capacity)
    for s_block, group, g_pad in ((2048, 8, 128), (4096, 32, 128), (4096, 4, 256), (8192, 16, 256)):
        build_one(triton_select_two_level._topk_two_level_kernel, two_types,
                  common | {"GROUP": group, "S_BLOCK": s_block, "G_PAD": g_pad},
                  triton_select_two_level._warps(max(s_block, g_pad * group, common["K_PAD"])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2, help="layers in the page-major storage (page stride)")
    ap.add_argument("--table-pages", default="0", help="page-table widths (if above ctx / page), e.g. 0,8200")
    ap.add_argument("--no-heat", action="store_true", help="no per-page selection counts (tiers off)")
    ap.add_argument("--output", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU (TRITON_INTERPRET=1), tiny sizes, check only")
    ap.add_argument("--ptxas", action="store_true", help="no GPU needed: compile for sm_90, print registers/spills")
    a = ap.parse_args()
    if a.ptxas:
        return ptxas_report(a)
    dev = torch.device("cpu" if a.smoke else "cuda")
    rows = []
    print(f"{'B':>3} {'pages':>6} {'variant':<18} {'eager us':>9} {'graph us':>9} {'x32 layers ms':>12}")
    for width in (int(x) for x in str(a.table_pages).split(",")):
        for B in (int(x) for x in a.batch.split(",")):
            rows += bench_batch(B, a, dev, width)
            torch.cuda.empty_cache()
    if a.output:
        meta_info = {"tool": "scripts/bench_sparse_select.py", "settings": vars(a),
                     "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__}
        with open(a.output, "w") as f:
            json.dump({"meta": meta_info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
