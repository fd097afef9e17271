"""Compile a Triton kernel for sm_90 without a GPU (Triton's bundled ptxas): registers and spills, or the
compiler's error. Pointer arguments and arguments named ``s_*`` (strides) get ``tt.divisibility`` 16, as Triton
specialises real launches (tensors 16-byte aligned, strides multiples of 16); without it the same kernels seem to
spill kilobytes per thread (scalar loads). Used by ptxas_fp8_kernels.py and bench_sparse_select.py --ptxas."""
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")


def compile_sm90(fn, signature: dict, consts: dict, warps: int, stages: int | None = None) -> str:
    """``signature``: argument name -> Triton type ("*bf16", "i32", ...) for the non-constexpr arguments.
    Returns ptxas' register / spill lines joined; raises RuntimeError with ptxas' message if it fails."""
    sig = dict(signature) | {k: "constexpr" for k in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in signature and (signature[a].startswith("*") or a.startswith("s_"))}
    options = {"num_warps": warps} | ({"num_stages": stages} if stages else {})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        r = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True,
                           text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return " | ".join(x.split(":")[-1].strip() for x in r.stderr.splitlines() if "registers" in x or "spill" in x)
