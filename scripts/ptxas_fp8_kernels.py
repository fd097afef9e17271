"""Compile the FP8 KV attention kernels for sm_90 without a GPU (Triton's bundled ptxas) and print registers and
spills per variant (compact pool, host rows, sparse selection): catches compile errors the interpreter does not
see, and register-pressure changes, before a GPU session.

Launch-time specialisation matters (``sm90_compile``): pointer and stride arguments get ``tt.divisibility`` 16.

  PYTHONPATH=. python scripts/ptxas_fp8_kernels.py        (Llama-3.1-8B shapes: 8 KV heads, GQA 4, D 128)
  PYTHONPATH=. python scripts/ptxas_fp8_kernels.py launches   (the dense decode kernel at other blocks / warps:
                                                                registers decide how many programs an SM holds)
"""
import sys

from sm90_compile import compile_sm90

from tierserve.attention import triton_decode_fp8, triton_decode_fp8_lean, triton_fp8_quant, triton_prefill_fp8
from tierserve.attention.triton_decode_fp8 import scale_offset

POINTERS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "src_ptr": "*bf16", "o_ptr": "*fp32", "lse_ptr": "*fp32",
            "lg_ptr": "*i64", "sel_ptr": "*i64", "pt_ptr": "*i64", "qstart_ptr": "*i64", "qlen_ptr": "*i64",
            "seqlen_ptr": "*i64", "soff_ptr": "*i64", "off_ptr": "*i64"}   # others: bytes (*u8)


def build(fn, consts: dict, warps: int, stages: int = 2) -> str:
    """``compile_sm90`` with the argument types read from the names (``*_ptr``: POINTERS or bytes)."""
    sig = {a: POINTERS.get(a, "*u8") if a.endswith("_ptr") else "fp32" if a == "qk_scale" else
           "i64" if a == "hbase" else "i32" for a in fn.arg_names if a not in consts}
    return compile_sm90(fn, sig, consts, warps, stages)


def main() -> None:
    off = scale_offset(16, 8, 128, 2, 17)
    for compact in (False, True):
        for host in (False, True):
            v = dict(COMPACT=compact, HOST=host)
            print("prefill", v, build(triton_prefill_fp8._prefill_fp8_kernel, dict(
                GROUP=4, GROUP_PAD=4, BLOCK_T=32, HEAD_DIM=128, PAGE=16, BLOCK_N=32, SCALE_OFF=off, WINDOW=0,
                UPCAST=False, **v), 8))
            print("scratch", v, build(triton_fp8_quant._scratch_kernel, dict(
                PAGE=16, PAGE_PAD=16, HEAD_DIM=128, SCALE_OFF=off, **v), 4))
            for sparse in (False, True):
                print("decode ", dict(v, SPARSE=sparse), build(triton_decode_fp8._fp8_decode_split_kernel, dict(
                    NUM_SPLITS=64, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, PAGE=16, BLOCK_N=64, SCALE_OFF=off, WINDOW=0,
                    DIRECT=False, UPCAST=False, SPARSE=sparse, RULE_LOADS=True, FAST=True, **v), 8))
        # the split launch (lean=True): the bulk kernel, and the general kernel's half (sink / recent / lagging)
        for bn, warps, stages in ((64, 4, 3), (64, 4, 5), (64, 8, 5), (128, 8, 3), (32, 4, 5)):
            print(f"lean bulk {bn}/{warps}w/{stages}s compact={compact}", build(
                triton_decode_fp8_lean._fp8_bulk_kernel, dict(PARTS=64, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, PAGE=16,
                                                              BULK_N=bn, SCALE_OFF=off, COMPACT=compact, UPCAST=False),
                warps, stages))
        print(f"lean general compact={compact}", build(triton_decode_fp8._fp8_decode_split_kernel, dict(
            NUM_SPLITS=66, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, PAGE=16, BLOCK_N=64, SCALE_OFF=off, WINDOW=0,
            DIRECT=False, UPCAST=False, SPARSE=False, RULE_LOADS=True, FAST=True, COMPACT=compact, HOST=False,
            LEAN=64, BULK_N=64), 4))


def launches() -> None:
    """The dense FP8 decode kernel (in place, the codes-only branch: the engine's dense default is 64-token blocks,
    4 warps) at other block sizes and warps; 65536 registers an SM / (registers x 32 x warps) programs fit."""
    off = scale_offset(16, 8, 128, 2, 17)
    for bn, warps in ((64, 4), (64, 8), (32, 4), (32, 2), (16, 2), (128, 8)):
        print(f"decode dense block {bn:3d} warps {warps}:", build(triton_decode_fp8._fp8_decode_split_kernel, dict(
            NUM_SPLITS=64, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, PAGE=16, BLOCK_N=bn, SCALE_OFF=off, WINDOW=0,
            DIRECT=False, UPCAST=False, SPARSE=False, RULE_LOADS=True, FAST=True, COMPACT=False, HOST=False), warps))


if __name__ == "__main__":
    launches() if sys.argv[1:] == ["launches"] else main()
