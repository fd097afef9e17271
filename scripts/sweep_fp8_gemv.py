"""H200 sweep of the FP8 block-scaled GEMV (quant/triton_fp8_gemv.py) at Llama-3.1-8B decode shapes, against
bf16 cuBLAS in the same run: tile width, warps, pipeline stages and split-K waves; each timing is a CUDA
graph of 16 calls, median of 7 replays. Prints the best configuration per (M, layer) and the GB/s it
reaches; JSON to $OUT/fp8-gemv-sweep.json. (Issue 6: FP8 weights decoded only 1.15x bf16 at batch 1.)

Each row also times the three tensor-core product modes of ``fp8_gemm(dot=...)`` at the default tiles
("act": weights widened to bf16, the default; "f16": widened to fp16; "fp8": fp8 x fp8 with activations
quantised per 1x128 group) -- whether widening e4m3 to bf16 is what holds the kernel below the bandwidth.
``GRID=0`` skips the tile sweep (modes only, ~20 s). Each row also sweeps the tiled weight layout (``tile_weight``,
``fp8_gemm(tiled=True)``: a program's K block is one contiguous read) over a small grid (``KGRID=0`` skips it)
and times a read-only kernel over the same tiles, row-major and tiled: the access pattern's bandwidth ceiling.
(Stop 17 also timed a register-operand "swap" kernel and a CUDA-core one: no faster / 3x slower,
benchmarks/results/fp8-gemv-kernels-h200.json; their code is in commit 23e777b.) ``DOT`` picks the mode the
tile sweep uses."""
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, ".")
from tierserve.bench.gpu_timer import graph_time_us  # noqa: E402
from tierserve.quant.fp8 import quantize_fp8_blockwise  # noqa: E402
from tierserve.quant.triton_fp8_gemv import fp8_gemm, tile_weight  # noqa: E402

dev = torch.device("cuda")
OUT = os.environ.get("OUT", "/tmp")

timed = graph_time_us

shapes = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
grid = list(itertools.product((32, 64, 128, 256), (4, 8), (3, 4, 6), (2, 4, 8, 16)))
if os.environ.get("GRID", "1") == "0":
    grid = []
DOT = os.environ.get("DOT", "act")
tiled_grid = list(itertools.product((32, 64, 128), (4, 8), (3, 4, 6), (2, 4, 8)))
if os.environ.get("KGRID", "1") == "0":
    tiled_grid = []
elif os.environ.get("KGRID") == "small":
    tiled_grid = list(itertools.product((32, 64, 128), (4, 8), (4,), (2, 4, 8)))


@triton.jit
def _read_kernel(w_ptr, out_ptr, K, num_kb, TILED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Sum a [BN, K] stripe of fp8 bytes, BK at a time, in ``fp8_gemm``'s tile order (row-major or tiled)."""
    pid = tl.program_id(0)
    rn = tl.arange(0, BN)[:, None]
    rk = tl.arange(0, BK)[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for kb in range(num_kb):
        if TILED:
            ptr = w_ptr + (pid.to(tl.int64) * num_kb + kb) * (BN * BK) + rn * BK + rk
        else:
            ptr = w_ptr + (pid.to(tl.int64) * BN + rn) * K + kb * BK + rk
        acc += tl.load(ptr).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


def read_probe(w, N, K, tiled, bn=64, bk=128):
    out = torch.empty(N // bn, device=w.device)
    _read_kernel[(N // bn,)](w, out, K, K // bk, TILED=tiled, BN=bn, BK=bk, num_warps=4, num_stages=4)
    return out
rows = []
for M in [int(m) for m in os.environ.get("MS", "1,16").split(",")]:
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        q, sc = quantize_fp8_blockwise(w)
        row = {"M": M, "layer": name, "N": N, "K": K, "fp8_MB": N * K / 1e6}
        row["cublas_bf16_us"] = timed(lambda: F.linear(x, w))
        row["default_us"] = timed(lambda: fp8_gemm(x, q, sc))
        want = fp8_gemm(x, q, sc, dot="act").float()
        for mode in ("act", "f16", "fp8"):
            row[f"dot_{mode}_us"] = timed(lambda: fp8_gemm(x, q, sc, dot=mode))
            row[f"dot_{mode}_TBps"] = N * K / (row[f"dot_{mode}_us"] * 1e-6) / 1e12
            got = fp8_gemm(x, q, sc, dot=mode).float()
            row[f"dot_{mode}_rel_err_vs_act"] = float((got - want).norm() / want.norm())
        # the tiled weight layout (tile_weight: each program's K block one contiguous run), over its own grid
        tbest, tiles = None, {}
        for bn, nw, st, wv in tiled_grid:
            try:
                tw = tiles.setdefault(bn, tile_weight(q, bn))
                us = timed(lambda: fp8_gemm(x, tw, sc, block_n=bn, num_warps=nw, num_stages=st, waves=wv,
                                            tiled=True))
            except Exception:          # noqa: BLE001 - a config that does not compile / fit
                continue
            if tbest is None or us < tbest[0]:
                tbest = (us, {"block_n": bn, "num_warps": nw, "num_stages": st, "waves": wv})
        if tbest is not None:
            got = fp8_gemm(x, tiles[tbest[1]["block_n"]], sc, tiled=True, **tbest[1])
            row["tiled_us"], row["tiled_cfg"] = tbest
            row["tiled_TBps"] = N * K / (tbest[0] * 1e-6) / 1e12
            row["tiled_rel_err_vs_act"] = float((got.float() - want).norm() / want.norm())
        # the bytes alone: the same tiles read and summed, row-major and tiled (the access pattern's ceiling)
        for lay, src in (("rows", q), ("tiles", tiles.get(64, tile_weight(q, 64)))):
            us = timed(lambda: read_probe(src, N, K, lay == "tiles"))
            row[f"read_{lay}_TBps"] = N * K / (us * 1e-6) / 1e12
        best = (row[f"dot_{DOT}_us"], {"default": True, "dot": DOT})
        for bn, nw, st, wv in grid:
            try:
                us = timed(lambda: fp8_gemm(x, q, sc, block_n=bn, num_warps=nw, num_stages=st, waves=wv, dot=DOT))
            except Exception:          # a config that does not compile / fit in shared memory
                continue
            if us < best[0]:
                best = (us, {"block_n": bn, "num_warps": nw, "num_stages": st, "waves": wv, "dot": DOT})
        row["best_us"], row["best_cfg"] = best
        for k in ("default", "best"):
            row[f"{k}_TBps"] = N * K / (row[f"{k}_us"] * 1e-6) / 1e12
        row["cublas_bf16_TBps"] = 2 * N * K / (row["cublas_bf16_us"] * 1e-6) / 1e12
        rows.append(row)
        print(f"M={M:>2} {name:8s} bf16 {row['cublas_bf16_us']:7.1f} us ({row['cublas_bf16_TBps']:.2f} TB/s) | fp8 "
              f"default {row['default_us']:7.1f} us ({row['default_TBps']:.2f}) best {row['best_us']:7.1f} us "
              f"({row['best_TBps']:.2f}) {row['best_cfg']} | dot act/f16/fp8 " + " / ".join(
                  f"{row[f'dot_{m}_TBps']:.2f}" for m in ("act", "f16", "fp8")) + " TB/s | " + " ".join(
                  f"{k} {row[f'{k}_TBps']:.2f} TB/s {row[f'{k}_cfg']}" for k in ("tiled",) if f"{k}_TBps" in row)
              + f" | read rows / tiles {row['read_rows_TBps']:.2f} / {row['read_tiles_TBps']:.2f} TB/s", flush=True)
json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows}, open(f"{OUT}/fp8-gemv-sweep.json", "w"), indent=1)
