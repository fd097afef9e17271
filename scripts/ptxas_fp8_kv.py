"""Registers and spills of the FP8-KV attention kernels (and the BF16 ones beside them) for sm_90, compiled
offline: Triton lowers to PTX and its bundled ptxas reports per-thread registers and spill bytes -- no GPU
needed. Llama-3.1-8B shapes (32 query heads, 8 KV heads, head_dim 128, 16-token pages, bf16).

Run: ``python scripts/ptxas_fp8_kv.py [decode|prefill ...]``. A kernel that spills at its default
configuration is slower than its byte count says; pick block sizes / warps that do not.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
PAGE_ELEMS = 32 * 2 * 16 * 8 * 128            # one page, all layers, in elements (the page stride)


def ptxas_info(jitfn, args: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90) -> str:
    """Compile ``jitfn`` for sm_<arch>: ``args`` maps each runtime argument to a type string ("*bf16", "fp32")
    or an example int; returns ptxas's register / spill summary."""
    sig, attrs = {}, {}
    for i, name in enumerate(jitfn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            sig[name] = v
            if v.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(jitfn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    out = subprocess.run([PTXAS, "-v", f"-arch=sm_{arch}a", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    lines = [ln.split(":", 1)[-1].strip() for ln in out.stderr.splitlines() if "registers" in ln or "spill" in ln]
    return "; ".join(lines) or out.stderr[-300:]


def decode() -> None:
    from tierserve.attention.triton_decode import _decode_split_kernel
    from tierserve.attention.triton_decode_fp8 import _fp8_decode_split_kernel
    split = dict(s_ob=32 * 9 * 128, s_oh=9 * 128, s_os=128, s_lb=32 * 9, s_lh=9)
    fp8 = dict(q_ptr="*bf16", kv_ptr="*bf16", kvb_ptr="*u8", flag_ptr="*u8", pt_ptr="*i64", seqlen_ptr="*i64",
               o_ptr="*fp32", lse_ptr="*fp32", qk_scale=0.1, keep_sink=16, keep_recent=64, s_qb=4096, s_qh=128,
               s_p=PAGE_ELEMS, s_kv=16 * 1024, s_t=1024, s_h=128, s_bp=2 * PAGE_ELEMS, s_bkv=2 * 16 * 1024, s_ptb=160,
               lg_ptr="*i64", sel_ptr="*i64", s_pth=0, s_selb=0, s_selh=0, **split)
    bf16 = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pt_ptr="*i64", seqlen_ptr="*i64", o_ptr="*fp32",
                lse_ptr="*fp32", qk_scale=0.1, s_qb=4096, s_qh=128, s_kp=PAGE_ELEMS, s_kt=1024, s_kh=128,
                s_vp=PAGE_ELEMS, s_vt=1024, s_vh=128, s_ptb=160, s_pth=0, s_slb=1, s_slh=0, hk_ptr="*bf16",
                hv_ptr="*bf16", s_hkp=PAGE_ELEMS, s_hvp=PAGE_ELEMS, n_dev=1000, **split)
    common = dict(NUM_SPLITS=9, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, PAGE=16, WINDOW=0, DIRECT=False, UPCAST=False)
    for bn, warps in ((64, 4), (64, 8), (128, 8), (32, 4)):
        print(f"decode bf16 block {bn:3d} warps {warps}:",
              ptxas_info(_decode_split_kernel, bf16, dict(common, BLOCK_N=bn, HOST=False), warps, 2))
        print(f"decode fp8  block {bn:3d} warps {warps}:",
              ptxas_info(_fp8_decode_split_kernel, fp8, dict(common, BLOCK_N=bn, SCALE_OFF=16384, SPARSE=False),
                         warps, 2))


def prefill() -> None:
    from tierserve.attention.triton_prefill import _prefill_kernel
    from tierserve.attention.triton_prefill_fp8 import _prefill_fp8_kernel
    rows = dict(qstart_ptr="*i64", qlen_ptr="*i64", seqlen_ptr="*i64", o_ptr="*bf16", qk_scale=0.1, s_qt=4096,
                s_qh=128, s_ptb=2048, s_ot=4096, s_oh=128)
    bf16 = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pt_ptr="*i64", s_kp=PAGE_ELEMS, s_kt=1024, s_kh=128,
                s_vp=PAGE_ELEMS, s_vt=1024, s_vh=128, hk_ptr="*bf16", hv_ptr="*bf16", s_hkp=PAGE_ELEMS,
                s_hvp=PAGE_ELEMS, n_dev=1000, **rows)
    fp8 = dict(q_ptr="*bf16", kv_ptr="*bf16", kvb_ptr="*u8", flag_ptr="*u8", pt_ptr="*i64", sc_ptr="*u8",
               soff_ptr="*i64", keep_sink=16, keep_recent=64, s_p=PAGE_ELEMS, s_kv=16 * 1024, s_t=1024, s_h=128,
               s_bp=2 * PAGE_ELEMS, s_bkv=2 * 16 * 1024, s_sp=32832, s_skv=16416, **rows)
    for r, bn, warps in ((128, 64, 8), (128, 32, 8), (64, 64, 4)):
        common = dict(GROUP=4, GROUP_PAD=4, BLOCK_T=r // 4, HEAD_DIM=128, PAGE=16, BLOCK_N=bn, WINDOW=0, UPCAST=False)
        print(f"prefill bf16 rows {r} block {bn} warps {warps}:",
              ptxas_info(_prefill_kernel, bf16, dict(common, HOST=False), warps, 2))
        print(f"prefill fp8  rows {r} block {bn} warps {warps}:",
              ptxas_info(_prefill_fp8_kernel, fp8, dict(common, SCALE_OFF=16384), warps, 2))


if __name__ == "__main__":
    for name in sys.argv[1:] or ["decode", "prefill"]:
        {"decode": decode, "prefill": prefill}[name]()
