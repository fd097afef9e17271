"""The FP8 decode kernel on a sparse step at 128k (issue 6, sections b and c): one sequence, Llama-3.1-8B attention
shapes, a selection of 128 pages (2048 tokens) per KV head out of a 128k context (the sink page, the recent pages
and random older ones), each call on its own layer of a 32-layer pool (as in a decode step: no L2 reuse between
calls), 32 calls timed in one CUDA graph. Baseline in the same run: the BF16 decode kernel on the same selection.

Cases: ``gpu`` (every page on the device, old pages stored FP8 in place) and ``host`` (90% of the selected old
pages read from pinned CPU RAM as compact rows, section c's tiered setting). For each: the engine's default
configuration (block_n / num_warps / num_stages, split-K by the 128k context), then a sweep (split-K, block size,
warps, stages, the codes-only branch). Prints a table; ``--output`` writes JSON; ``--smoke`` runs tiny sizes on the CPU
(TRITON_INTERPRET=1) to check the script, ``--check`` compares every configuration's output with the default's."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

from tierserve.attention.fp8_decode_config import KEYS
from tierserve.bench.gpu_timer import cuda_or_interpreter

HQ, HKV, D, PAGE, LAYERS, SINK, RECENT = 32, 8, 128, 16, 32, 16, 64
CTX, SEL = 131072, 128           # context tokens, selected pages per KV head
HOST_SHARE = 0.9


def setup(dev, dtype, host: bool, gen: torch.Generator, spread_gb: float = 0.0, layer_major: bool = False):
    """``spread_gb``: the CPU-RAM store holds that many GiB of slots and the selected rows sit at random slots
    across it (as in a 1M-token tier: ~70 GiB), instead of side by side; ``layer_major``: the store is laid out
    [layers, slots, 2, row bytes] (each layer's rows in one region) instead of the engine's [slots, layers, ...]."""
    from tierserve.attention.triton_fp8_quant import quantise_pages_triton
    from tierserve.quant.fp8_compact import slot_bytes

    P = CTX // PAGE + 1                                   # logical pages (the last one partly filled)
    n_old = SEL - 1 - RECENT // PAGE - 1                  # selected pages besides sink and recent ones
    recent = list(range(P - RECENT // PAGE - 1, P))
    logical = []
    for _ in range(HKV):
        old = torch.randperm(recent[0] - 1, generator=gen)[:n_old] + 1
        logical.append(sorted([0] + old.tolist() + recent))
    logical = torch.tensor(logical, dtype=torch.int64)                # [HKV, SEL]
    N = HKV * SEL + 1                                                  # distinct physical pages (+ scratch)
    table = torch.randperm(N - 1, generator=gen)[:HKV * SEL].view(HKV, SEL).to(torch.int32)
    data = torch.randn(N, LAYERS, 2, PAGE, HKV, D, device=dev, dtype=dtype,
                       generator=torch.Generator(device=dev).manual_seed(1))
    old_mask = (logical > 0) & (logical < recent[0])
    stored = table[old_mask].to(torch.int64).to(dev)
    quantise_pages_triton(data, stored, PAGE)
    flags = torch.zeros(N, dtype=torch.bool, device=dev)
    flags[stored] = True
    hostbuf, dev_table = None, table[None].to(dev)
    if host:             # 90% of the old selected pages as compact rows in pinned CPU RAM, ids after the device's
        sb = slot_bytes(PAGE, HKV, D, 1, data.element_size())
        olds = table[old_mask]
        pick = torch.randperm(olds.numel(), generator=gen)[:int(HOST_SHARE * olds.numel())]
        moved = olds[pick]
        moved_heads = torch.arange(HKV)[:, None].expand(HKV, SEL)[old_mask][pick]     # the head that reads each
        blocks = data.view(N, LAYERS, 2, -1).view(torch.uint8)[moved.to(dev).long(), :, :, :sb].cpu()
        S = max(moved.numel(), int(spread_gb * 2**30 // (LAYERS * 2 * sb)))
        shape = (LAYERS, S, 2, sb) if layer_major else (S, LAYERS, 2, sb)
        hostbuf = torch.empty(shape, dtype=torch.uint8, pin_memory=dev.type == "cuda")
        at = torch.randperm(S, generator=gen)[:moved.numel()]          # where the selected rows sit
        if layer_major:
            hostbuf[:, at] = blocks.transpose(0, 1)
        else:
            hostbuf[at] = blocks
        slot_of = {int(p): int(at[i]) for i, p in enumerate(moved.tolist())}
        table = torch.tensor([[N + slot_of[int(p)] if int(p) in slot_of else int(p) for p in row]
                              for row in table.tolist()], dtype=torch.int32)
    seq = torch.full((1,), CTX + 1, dtype=torch.int32, device=dev)
    lens = torch.full((1, HKV), (SEL - 1) * PAGE + 1, dtype=torch.int32, device=dev)
    return dict(data=data, flags=flags, table=table[None].to(dev), logical=logical[None].to(dev), seq=seq,
                lens=lens, host=hostbuf, N=N, layer_major=layer_major, dev_table=dev_table,
                host_slots=at if host else None, slot_bytes=sb if host else 0,
                host_heads=moved_heads if host else None)


_READ_ROWS = None


def _read_rows_kernel():
    """The row-reading kernel, defined on first use (after ``cuda_or_interpreter`` chose the interpreter or not):
    one program per (selected row, K/V) reads, where the row lies (CPU RAM through the PCIe bus when ``src`` is
    page-locked host memory), the bytes the decode reads of it -- its head's FP8 codes, ``PAGE`` runs of ``D`` bytes
    ``H * D`` apart, and the head's scale -- and stores their xor (so that the reads are not dropped)."""
    global _READ_ROWS
    if _READ_ROWS is None:
        import triton
        import triton.language as tl

        @triton.jit
        def read_rows(src_ptr, slots_ptr, heads_ptr, out_ptr, layer, s_slot, s_layer, s_kv, scale_word,
                      PAGE: tl.constexpr, H: tl.constexpr, DW: tl.constexpr):
            r = tl.program_id(0)
            c = tl.program_id(1)
            slot = tl.load(slots_ptr + r).to(tl.int64)
            h = tl.load(heads_ptr + r)
            base = src_ptr + slot * s_slot + layer * s_layer + c * s_kv
            t = tl.arange(0, PAGE)[:, None]
            w = tl.arange(0, DW)[None, :]
            acc = tl.load(base + (t * H + h) * DW + w)                      # [PAGE, D / 4] int32 words
            x = tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0) ^ tl.load(base + scale_word + h)
            tl.store(out_ptr + r * 2 + c, x)
        _READ_ROWS = read_rows
    return _READ_ROWS


def pcie_rows(inp, dev, cuda: bool, case: str) -> list[dict]:
    """Baselines of the host case in the same run, for one layer's selected rows in CPU RAM: the bytes the FP8
    decode reads over PCIe (each row's head codes + scale: PAGE x D + 4 bytes a row and K/V) moved by the copy
    engine (contiguous, page-locked -> device), and read in place by a kernel that only reads them (zero-copy, as
    the decode does) -- the PCIe roofline the decode can reach. (Stop 24's first run of these baselines moved and
    read whole rows, every head's codes: 8x the decode's bytes.)"""
    from tierserve.quant.fp8_compact import slot_offsets

    hb, sb, slots, heads = inp["host"], inp["slot_bytes"], inp["host_slots"], inp["host_heads"]
    if inp["layer_major"] or sb % 4 or D % 4:
        return []
    n_codes, scale_off, _ = slot_offsets(PAGE, HKV, D)
    nbytes = slots.numel() * 2 * (PAGE * D + 4)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    words = hb.view(torch.int32)                     # [S, LAYERS, 2, sb / 4]
    slots_d, heads_d = slots.to(dev), heads.to(torch.int32).to(dev)
    out = torch.empty(slots.numel() * 2, dtype=torch.int32, device=dev)
    kern = _read_rows_kernel()

    def read(layer):
        kern[(slots.numel(), 2)](words, slots_d, heads_d, out, layer, words.stride(0), words.stride(1),
                                 words.stride(2), scale_off // 4, PAGE=PAGE, H=HKV, DW=D // 4)
    rows = []
    for kernel, fn in (("pcie copy engine (the decode's bytes, contiguous)",
                        lambda i: dst.copy_(src, non_blocking=True)),
                       ("pcie zero-copy read kernel (the decode's bytes, in place)", read)):
        us = timed(fn, cuda)
        rows.append(dict(case=case, kernel=kernel, bytes_per_layer=nbytes, us=us, GBps=nbytes / us / 1e3))
        print(json.dumps(rows[-1]), flush=True)
    if not cuda:                                     # the reads hit the right words: each row's head codes + scale
        w = words[slots.long(), 0]                                          # [n, 2, sb / 4]
        want = torch.zeros(slots.numel(), 2, dtype=torch.int32)
        for t in range(PAGE):
            for j in range(D // 4):
                want ^= w.gather(2, ((t * HKV + heads.long()) * (D // 4) + j)[:, None, None].expand(-1, 2, 1))[..., 0]
        want ^= w.gather(2, (scale_off // 4 + heads.long())[:, None, None].expand(-1, 2, 1))[..., 0]
        read(0)
        assert torch.equal(out, want.reshape(-1)), "the read kernel read other words"
    return rows

def call(inp, layer: int, q, cfg: dict, out=None):
    from tierserve.attention.triton_decode_fp8 import paged_decode_fp8
    kv = inp["data"][:, layer]
    hb = inp["host"]
    host = ((hb[layer] if inp["layer_major"] else hb[:, layer]), inp["N"]) if hb is not None else None
    return paged_decode_fp8(q[layer], kv, inp["flags"], inp["table"], inp["seq"], D ** -0.5, PAGE, SINK, RECENT,
                            selection=(inp["logical"], inp["lens"]), host=host, out=out, **cfg)


def bf16_call(inp, layer: int, q, splits: int):
    from tierserve.attention.triton_decode import paged_decode
    kv = inp["data"][:, layer]
    return paged_decode(q[layer], kv[:, 0], kv[:, 1], inp["table"], inp["lens"], D ** -0.5, num_splits=splits)


def timed(fn, cuda: bool) -> float:
    """us per call: LAYERS calls (one per layer) in one CUDA graph, median of 7 replays."""
    if not cuda:
        t = time.perf_counter()
        fn(0)
        return (time.perf_counter() - t) * 1e6
    from tierserve.bench.gpu_timer import graph_time_us
    state = {"i": 0}

    def one():
        fn(state["i"] % LAYERS)
        state["i"] += 1
    return graph_time_us(one, reps=LAYERS)


def grid(default_splits: int):
    """First pass: split-K x (block size, warps) (num_stages 2)."""
    for splits, (bn, w) in itertools.product((16, 8, default_splits), ((32, 4), (16, 2), (64, 4), (16, 4), (64, 8))):
        yield dict(num_splits=splits, block_n=bn, num_warps=w, num_stages=2)


def refine(top: list[dict]):
    """Second pass, around the first pass's best three: num_stages 1, the codes-only branch."""
    for cfg in top:
        for st, fast in ((1, False), (2, True)):
            yield {**cfg, "num_stages": st, "fast": fast}


def main() -> None:
    global HQ, HKV, D, LAYERS, CTX, SEL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the default configuration only (no sweep)")
    ap.add_argument("--check", action="store_true", help="compare each configuration's output with the default's")
    ap.add_argument("--cases", default="gpu,host", help="gpu, host (the selected rows side by side in CPU RAM), "
                    "host-spread (across --spread-gb of CPU RAM), host-spread-lm (the same, layer-major store)")
    ap.add_argument("--spread-gb", type=float, default=64.0, help="CPU RAM the host-spread cases' store spans")
    ap.add_argument("--budget-s", type=float, default=90.0, help="seconds of sweep per case")
    ap.add_argument("--env", help="write shell exports of each case's best settings here "
                                  "(TIERSERVE_FP8_SPARSE_DECODE / TIERSERVE_FP8_SPARSE_HOST_DECODE)")
    ap.add_argument("--configs", help="time these settings instead of the sweep: ';'-separated "
                    "attention/fp8_decode_config settings, e.g. 'block_n=16,num_warps=2,fast=1;num_splits=16'")
    ap.add_argument("--output")
    a = ap.parse_args()
    cuda = cuda_or_interpreter(a.smoke)
    if a.smoke:
        HQ, HKV, D, LAYERS, CTX, SEL = 4, 2, 16, 2, 2048, 16
    from tierserve.attention.backend import choose_splits
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 132
    default_splits = choose_splits(1, HKV, CTX + 144, sms)          # the engine's graphs: by max_model_len
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(LAYERS, 1, HQ, D, generator=gen).to(dtype).to(dev)
    rows = []
    for case in a.cases.split(","):
        if case not in ("gpu", "host", "host-spread", "host-spread-lm"):
            sys.exit(f"unknown case {case!r}")
        inp = setup(dev, dtype, case.startswith("host"), gen, a.spread_gb if "spread" in case else 0.0,
                    case.endswith("-lm"))
        if case == "gpu":
            for splits in (default_splits, 8):
                us = timed(lambda i, s=splits: bf16_call(inp, i, q, s), cuda)
                rows.append(dict(case=case, kernel="bf16 decode (same selection, bf16 pages)", splits=splits, us=us))
        if case.startswith("host"):
            rows += pcie_rows(inp, dev, cuda, case)
        ref = call(inp, 0, q, dict(num_splits=default_splits)).float()
        if a.check and inp["host"] is not None:       # rows read from CPU RAM == the same pages read on the device
            same = call({**inp, "host": None, "table": inp["dev_table"]}, 0, q, dict(num_splits=default_splits))
            diff = (same.float() - ref).abs().max().item()
            print(f"{case}: host reads vs device reads, max abs diff {diff}")
            assert diff == 0.0, diff

        def run(cfg):
            try:
                us = timed(lambda i: call(inp, i, q, cfg), cuda)
                row = dict(case=case, kernel="fp8 decode", **cfg, us=us)
                if a.check:
                    got = call(inp, 0, q, cfg)
                    row["max_abs_diff_vs_default"] = (got.float() - ref).abs().max().item()
                    if cfg.get("fast"):     # bit-identical to the same setting without it
                        row["same_bits_without_fast"] = torch.equal(got, call(inp, 0, q, {**cfg, "fast": False}))
            except Exception as e:          # a configuration that does not compile is reported, not fatal
                row = dict(case=case, kernel="fp8 decode", **cfg, error=f"{type(e).__name__}: {str(e)[:100]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            return row
        run(dict(num_splits=default_splits))           # the engine's default
        if a.configs:
            from tierserve.attention.fp8_decode_config import parse
            for text in filter(None, a.configs.split(";")):
                run({"num_splits": default_splits, **parse(text, "--configs")})
        elif not a.quick:
            stop = time.perf_counter() + a.budget_s          # configurations past the budget are not started
            first = [run(c) for c in grid(default_splits) if time.perf_counter() < stop]
            top = sorted((r for r in first if "us" in r), key=lambda r: r["us"])[:2]
            top = [r for r in top if time.perf_counter() < stop]
            for c in refine([{k: r[k] for k in ("num_splits", "block_n", "num_warps", "num_stages")}
                             for r in top]):
                if time.perf_counter() < stop:
                    run(c)
        inp = None          # frees the pool (and the pinned store) before the next case
        if cuda:
            from tierserve.bench.sparse_fp8_run import free_memory
            free_memory()
    best = {}
    for r in rows:
        if r["kernel"] == "fp8 decode" and "us" in r and (r["case"] not in best or r["us"] < best[r["case"]]["us"]):
            best[r["case"]] = r
    print("case | kernel | config | us")
    for r in [r for r in rows if r["kernel"] != "fp8 decode" or "num_warps" not in r] + list(best.values()):
        if "GBps" in r:
            print(f"{r['case']} | {r['kernel']} | {r['bytes_per_layer']} B a layer | {r['us']:.2f} ({r['GBps']:.1f} GB/s)")
            continue
        cfg = ",".join(f"{k}={r[k]}" for k in KEYS if k in r)
        print(f"{r['case']} | {r['kernel']} | {cfg} | {r.get('us', float('nan')):.2f}")
    if a.env:
        names = {"gpu": "TIERSERVE_FP8_SPARSE_DECODE", "host": "TIERSERVE_FP8_SPARSE_HOST_DECODE"}
        with open(a.env, "w") as f:
            for case, r in best.items():
                if case not in names:
                    continue
                val = ",".join(f"{k}={int(r[k])}" for k in KEYS if k in r)
                f.write(f"export {names[case]}={val}\n")
    if a.output:
        meta = dict(device=torch.cuda.get_device_name(dev) if cuda else "cpu", torch=torch.__version__,
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), context=CTX, selected_pages=SEL,
                    layers=LAYERS, host_share=HOST_SHARE,
                    shapes=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, page=PAGE, keep_sink=SINK, keep_recent=RECENT))
        with open(a.output, "w") as f:
            json.dump({"meta": meta, "rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
