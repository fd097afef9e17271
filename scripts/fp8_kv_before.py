"""The FP8-KV attention kernels as they were before issue 6's rework (commit 0e24fc2), loaded from git so
scripts/bench_fp8_kv.py can time them beside the current ones in the same run. Needs the repository's
git history; returns None without it."""
from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

REV = "0e24fc2"
ROOT = Path(__file__).resolve().parents[1]


def load(rev: str = REV):
    """(paged_decode_fp8, paged_prefill_fp8) of ``rev``, or None when git or the commit is not there."""
    try:
        src = {name: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:tierserve/attention/{name}.py"],
                                    capture_output=True, text=True, check=True).stdout
               for name in ("triton_decode_fp8", "triton_prefill_fp8")}
    except (OSError, subprocess.CalledProcessError):
        return None
    d = Path(tempfile.mkdtemp(prefix="fp8_before_"))
    (d / "before_decode_fp8.py").write_text(src["triton_decode_fp8"])
    (d / "before_prefill_fp8.py").write_text(src["triton_prefill_fp8"].replace(
        "from tierserve.attention.triton_decode_fp8 import", "from before_decode_fp8 import"))
    sys.path.insert(0, str(d))      # Triton reads kernel sources from files
    dec, pre = importlib.import_module("before_decode_fp8"), importlib.import_module("before_prefill_fp8")
    return dec.paged_decode_fp8, pre.paged_prefill_fp8
