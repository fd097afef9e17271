"""The FP8-KV attention kernels as they were before issue 6's rework (commit 0e24fc2), or at another commit,
loaded from git so scripts/bench_fp8_kv.py can time them beside the current ones in the same run. Needs the
repository's git history (returns None without it) or, on a machine without it, ``FP8_BEFORE_DIR``: a folder
with that commit's files of NAMES and SHARED (``git show REV:tierserve/attention/NAME.py``). One commit per
process (the modules are imported under fixed names)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REV = "0e24fc2"
NAMES = ("triton_decode_fp8", "triton_prefill_fp8")                 # kernels
SHARED = ("triton_fp8_common", "triton_fp8_blocks")                  # their building blocks (absent at old commits)
ROOT = Path(__file__).resolve().parents[1]


def _source(rev: str, name: str) -> str:
    """tierserve/attention/NAME.py at ``rev`` ('' for shared blocks at a commit that predates them)."""
    if os.environ.get("FP8_BEFORE_DIR"):
        path = Path(os.environ["FP8_BEFORE_DIR"]) / f"{name}.py"
        return path.read_text() if path.exists() or name not in SHARED else ""
    r = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:tierserve/attention/{name}.py"],
                       capture_output=True, text=True, check=name not in SHARED)
    return r.stdout if r.returncode == 0 else ""


def load(rev: str = REV):
    """(paged_decode_fp8, paged_prefill_fp8) of ``rev``, or None when git or the commit is not there."""
    try:
        src = {name: _source(rev, name) for name in NAMES + SHARED}
    except (OSError, subprocess.CalledProcessError):
        return None
    # the modules import each other as that commit's copies, so that later changes are not timed as "before"
    d = Path(tempfile.mkdtemp(prefix="fp8_before_"))
    for name, text in src.items():
        for other in src:
            text = text.replace(f"from tierserve.attention.{other} import", f"from before_{other} import")
        (d / f"before_{name}.py").write_text(text)
    sys.path.insert(0, str(d))      # Triton reads kernel sources from files
    dec = importlib.import_module("before_triton_decode_fp8")
    pre = importlib.import_module("before_triton_prefill_fp8")
    return dec.paged_decode_fp8, pre.paged_prefill_fp8
