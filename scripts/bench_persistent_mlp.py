"""Experiment for issue 6 (a, b): can one persistent kernel keep HBM busy across a layer's dependent projections?

A batch-1 decode step is a chain of short kernels; each FP8 projection loses its ramp and tail (~3.2 TB/s effective
in the engine against ~4.2 possible), and prefetches across the PDL wait did not help (stops 21-22). Here one
layer's MLP (Llama-8B: x [4096] -> gate_up [28672 x 4096] FP8 -> silu * up -> down [4096 x 14336] FP8) runs two ways
in the same process on the same weights:

* ``chain``: the engine's kernels -- ``fp8_gemv_rows`` (gate_up), ``silu_mul``, ``fp8_gemv_rows`` (down, split-K + its
  reduce);
* ``persistent``: one kernel of G programs, all resident, in three phases separated by grid barriers (an atomic
  counter each program bumps, then spins on): (1) gate / up rows and silu * up -> act, (2) down split-K partials, (3)
  their fixed-order sum. Before the first barrier each program loads its first down weights (they do not depend on
  act), so HBM keeps streaming while the slowest programs finish phase 1.

A third row per config runs the same code as three launches (no barrier): what the persistence itself changes.
All are timed in CUDA graphs (``gpu_timer.graph_time_us``: 32 calls a replay, median of 7) after a check that they
agree (bf16 rounding: the sums run in another order), with the HBM copy bandwidth of the same run as the roofline.

    python scripts/bench_persistent_mlp.py [--configs 512:4:512:4,256:4:512:8] [--output FILE]   (GPU)
    TRITON_INTERPRET=1 python scripts/bench_persistent_mlp.py --cpu   (the phases as three launches, tiny shapes)
    PYTHONPATH=.:scripts python scripts/bench_persistent_mlp.py --ptxas   (sm_90 registers / spills, no GPU)

A config is G:R:BK:warps[:0] (programs, act rows a phase-1 tile, phase-1 columns an iteration, warps; a trailing 0:
the first down weights loaded after the barrier, to see what loading them before it buys); G is lowered to
what the GPU holds at once (registers / threads of the compiled kernel) -- a grid barrier with programs waiting for
a slot would never return.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from tierserve.bench.gpu_timer import graph_time_us

NB_ROWS = 32          # down rows a phase-2 program sums
BK2 = 256             # phase-2 columns an iteration


@triton.jit
def _grid_barrier(bar_ptr, G):
    """Every program of the launch arrives before any leaves; the counter only grows (launch L waits for (L+1) G)."""
    tl.debug_barrier()
    v = tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    target = (v // G + 1) * G
    cur = tl.load(bar_ptr, volatile=True)
    while cur < target:
        cur = tl.load(bar_ptr, volatile=True)
    tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _mlp_kernel(x_ptr, wgu_ptr, sgu_ptr, wd_ptr, sd_ptr, act_ptr, part_ptr, out_ptr, bar_ptr, G,
                K: tl.constexpr, I: tl.constexpr, N: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                S: tl.constexpr, PHASE: tl.constexpr, NBR: tl.constexpr, B2: tl.constexpr, PRE: tl.constexpr = True):
    pid = tl.program_id(0)
    KB: tl.constexpr = (K + 127) // 128          # scale columns of gate_up
    IB: tl.constexpr = (I + 127) // 128          # scale columns of down
    if PHASE == 0 or PHASE == 1:                 # gate / up rows -> silu(gate) * up
        for t in range(pid, I // R, G):
            r = t * R + tl.arange(0, R)
            acc_g = tl.zeros([R, BK], dtype=tl.float32)
            acc_u = tl.zeros([R, BK], dtype=tl.float32)
            sg = sgu_ptr + (t * R // 128) * KB
            su = sgu_ptr + ((I + t * R) // 128) * KB
            for k0 in range(0, K, BK):
                k = k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + (r * 0)[:, None] + k[None, :]).to(tl.float32)
                wg = tl.load(wgu_ptr + r.to(tl.int64)[:, None] * K + k[None, :]).to(tl.float32)
                wu = tl.load(wgu_ptr + (I + r).to(tl.int64)[:, None] * K + k[None, :]).to(tl.float32)
                acc_g += wg * (x * tl.load(sg + k // 128)[None, :])
                acc_u += wu * (x * tl.load(su + k // 128)[None, :])
            g = tl.sum(acc_g, axis=1).to(tl.bfloat16).to(tl.float32)
            u = tl.sum(acc_u, axis=1).to(tl.bfloat16).to(tl.float32)
            a = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32)
            tl.store(act_ptr + r, (a * u).to(tl.bfloat16))
    rows = (pid % (N // NBR)) * NBR + tl.arange(0, NBR)
    span: tl.constexpr = I // S
    k_lo = (pid // (N // NBR)) * span
    sd = sd_ptr + (rows // 128).to(tl.int64)[:, None] * IB
    if PHASE == 0 or PHASE == 2:
        k = k_lo + tl.arange(0, B2)
        if PHASE == 0 and not PRE:
            _grid_barrier(bar_ptr, G)
        w0 = tl.load(wd_ptr + rows.to(tl.int64)[:, None] * I + k[None, :])       # no dependence on act: before
        if PHASE == 0 and PRE:
            _grid_barrier(bar_ptr, G)
        a = tl.load(act_ptr + (rows * 0)[:, None] + k[None, :], cache_modifier=".cg").to(tl.float32)
        acc = w0.to(tl.float32) * (a * tl.load(sd + (k // 128)[None, :]))
        for k0 in range(k_lo + B2, k_lo + span, B2):
            k = k0 + tl.arange(0, B2)
            w = tl.load(wd_ptr + rows.to(tl.int64)[:, None] * I + k[None, :]).to(tl.float32)
            a = tl.load(act_ptr + (rows * 0)[:, None] + k[None, :], cache_modifier=".cg").to(tl.float32)
            acc += w * (a * tl.load(sd + (k // 128)[None, :]))
        tl.store(part_ptr + (pid // (N // NBR)) * N + rows, tl.sum(acc, axis=1))
    if PHASE == 0:
        _grid_barrier(bar_ptr, G)
    if PHASE == 0 or PHASE == 3:                 # the partials summed in split order
        for n0 in range(pid * 16, N, G * 16):
            n = n0 + tl.arange(0, 16)
            y = tl.zeros([16], dtype=tl.float32)
            for s in range(S):
                y += tl.load(part_ptr + s * N + n, cache_modifier=".cg")
            tl.store(out_ptr + n, y.to(tl.bfloat16))


def resident_programs(kernel, warps: int) -> int:
    """Programs of ``kernel`` one SM holds at once (registers, threads, shared memory; conservative)."""
    props = torch.cuda.get_device_properties(0)
    regs = max(kernel.n_regs, 1)
    by_regs = 65536 // (((regs * 32 + 255) // 256) * 256 * warps)
    by_threads = 2048 // (32 * warps)
    smem = kernel.metadata.shared or 0
    by_smem = (227 * 1024) // smem if smem else 64
    return max(0, min(by_regs, by_threads, by_smem, 32)) * props.multi_processor_count


def persistent(x, wgu, sgu, wd, sd, G, R, BK, warps, bufs, phases=(0,), pre=True):
    K, I, N = x.shape[-1], wd.shape[1], wd.shape[0]
    S = G // (N // NB_ROWS)
    act, part, out, bar = bufs
    for ph in phases:
        _mlp_kernel[(G,)](x, wgu, sgu, wd, sd, act, part, out, bar, G, K=K, I=I, N=N, R=R, BK=BK, S=S, PHASE=ph,
                          NBR=NB_ROWS, B2=BK2, PRE=pre, num_warps=warps)
    return out


def chain(x, wgu, sgu, wd, sd):
    from tierserve.models.layers.triton_fused import silu_mul
    from tierserve.quant.triton_fp8_gemv_rows import fp8_gemv_rows
    return fp8_gemv_rows(silu_mul(fp8_gemv_rows(x, wgu, sgu)), wd, sd)


def reference(x, wgu, sgu, wd, sd):
    from tierserve.quant.fp8 import dequantize_fp8_blockwise
    gu = (x.float() @ dequantize_fp8_blockwise(wgu, sgu, (128, 128), torch.float32).T).to(x.dtype)
    g, u = gu.chunk(2, dim=-1)
    act = (torch.nn.functional.silu(g.float()).to(x.dtype).float() * u.float()).to(x.dtype)
    return (act.float() @ dequantize_fp8_blockwise(wd, sd, (128, 128), torch.float32).T).to(x.dtype)


def weights(K, I, N, dev, seed=0):
    from tierserve.quant.fp8 import quantize_fp8_blockwise
    g = torch.Generator(device=dev).manual_seed(seed)
    wgu, sgu = quantize_fp8_blockwise(torch.randn(2 * I, K, device=dev, generator=g) * 0.02, (128, 128))
    wd, sd = quantize_fp8_blockwise(torch.randn(N, I, device=dev, generator=g) * 0.02, (128, 128))
    x = torch.randn(1, K, device=dev, generator=g).to(torch.bfloat16)
    return x, wgu, sgu.contiguous(), wd, sd.contiguous()


def cpu_check() -> None:
    """The three phases as separate launches under the interpreter (no barrier), against the engine's kernels."""
    K, I, N = 256, 1024, 128
    x, wgu, sgu, wd, sd = weights(K, I, N, torch.device("cpu"))
    for G, R, BK in ((8, 4, 128), (16, 8, 256)):
        S = G // (N // NB_ROWS)
        bufs = (torch.empty(I, dtype=torch.bfloat16), torch.empty(S, N), torch.empty(1, N, dtype=torch.bfloat16),
                torch.zeros(1, dtype=torch.int32))
        got = persistent(x, wgu, sgu, wd, sd, G, R, BK, 4, bufs, phases=(1, 2, 3))
        base = chain(x, wgu, sgu, wd, sd)
        ref = reference(x, wgu, sgu, wd, sd)
        err = float((got.float() - base.float()).norm() / base.float().norm())
        err_ref = float((got.float() - ref.float()).norm() / ref.float().norm())
        print(f"G={G} R={R} BK={BK}: relative error {err:.2e} against the engine's kernels, {err_ref:.2e} against "
              f"the torch reference (the engine's kernels: the same under the interpreter)")
        assert err < 2e-3, err


def ptxas(configs: str) -> None:
    """Compile each config for sm_90 without a GPU: registers and spills."""
    from sm90_compile import compile_sm90
    types = ["*bf16", "*fp8e4nv", "*fp32", "*fp8e4nv", "*fp32", "*bf16", "*fp32", "*bf16", "*i32", "i32"]
    sig = dict(zip(_mlp_kernel.arg_names[:len(types)], types))
    for cfg in configs.split(","):
        G, R, BK, warps, *pre = (int(v) for v in cfg.split(":"))
        consts = dict(K=4096, I=14336, N=4096, R=R, BK=BK, S=G // (4096 // NB_ROWS), PHASE=0, NBR=NB_ROWS, B2=BK2,
                      PRE=bool(pre[0]) if pre else True)
        print(cfg, compile_sm90(_mlp_kernel, sig, consts, warps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="512:4:512:4,512:4:512:4:0,256:4:512:8,512:8:256:8,512:4:1024:8")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--ptxas", action="store_true", help="no GPU: compile the configs for sm_90 (PYTHONPATH=.:scripts)")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    if a.cpu:
        return cpu_check()
    if a.ptxas:
        return ptxas(a.configs)
    dev = torch.device("cuda")
    K, I, N = 4096, 14336, 4096
    x, wgu, sgu, wd, sd = weights(K, I, N, dev)
    nbytes = wgu.numel() + wd.numel() + 4 * (sgu.numel() + sd.numel())
    from tierserve.bench.decode import copy_bandwidth
    bw = copy_bandwidth(dev)
    want = chain(x, wgu, sgu, wd, sd)
    rows = [{"variant": "chain", "us": graph_time_us(lambda: chain(x, wgu, sgu, wd, sd), reps=32)}]
    for cfg in a.configs.split(","):
        G, R, BK, warps, *pre = (int(v) for v in cfg.split(":"))
        pre = bool(pre[0]) if pre else True
        bar = torch.zeros(1, dtype=torch.int32, device=dev)
        act = torch.empty(I, dtype=torch.bfloat16, device=dev)
        probe = _mlp_kernel.warmup(x, wgu, sgu, wd, sd, act, act, act, bar, G, K=K, I=I, N=N, R=R, BK=BK,
                                   S=max(1, G // (N // NB_ROWS)), PHASE=0, NBR=NB_ROWS, B2=BK2, PRE=pre,
                                   num_warps=warps, grid=(G,))
        if hasattr(probe, "_init_handles"):
            probe._init_handles()           # n_regs is filled in when the binary is loaded
        hold = resident_programs(probe, warps)
        G = min(G, hold // (N // NB_ROWS) * (N // NB_ROWS))
        if G < N // NB_ROWS or (I // BK2) % (G // (N // NB_ROWS)):
            rows.append({"variant": f"persistent {cfg}", "skipped": f"{hold} programs resident, G={G}"})
            continue
        bufs = (act, torch.empty(G // (N // NB_ROWS), N, device=dev), torch.empty(1, N, dtype=torch.bfloat16,
                                                                                     device=dev), bar)
        got = persistent(x, wgu, sgu, wd, sd, G, R, BK, warps, bufs, pre=pre)
        err = float((got.float() - want.float()).norm() / want.float().norm())
        row = {"variant": f"persistent {cfg}", "G": G, "regs": probe.n_regs, "resident": hold, "rel_err": err}
        if err < 2e-2:
            row["us"] = graph_time_us(lambda: persistent(x, wgu, sgu, wd, sd, G, R, BK, warps, bufs, pre=pre), reps=32)
        rows.append(row)
        if pre:             # control: the same code as three launches (no barrier, nothing loaded across it)
            rows.append({"variant": f"three launches {cfg}", "G": G, "us": graph_time_us(
                lambda: persistent(x, wgu, sgu, wd, sd, G, R, BK, warps, bufs, phases=(1, 2, 3)), reps=32)})
    for r in rows:
        if "us" in r:
            r["TBps"] = nbytes / (r["us"] * 1e-6) / 1e12
            r["roofline_frac"] = nbytes / (r["us"] * 1e-6) / bw
        print(json.dumps(r), flush=True)
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"meta": {"tool": "scripts/bench_persistent_mlp.py", "device": torch.cuda.get_device_name(),
                                "copy_GBps": bw / 1e9, "bytes": nbytes}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
