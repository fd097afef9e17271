"""The FP8-KV attention kernels as they were before issue 6's rework (commit 0e24fc2), or at another commit,
loaded from git so scripts/bench_fp8_kv.py can time them beside the current ones in the same run. Needs the
repository's git history (returns None without it) or, on a machine without it, ``FP8_BEFORE_DIR``: a folder
with the three files of that commit (``git show REV:tierserve/attention/NAME.py``)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REV = "0e24fc2"
NAMES = ("triton_decode_fp8", "triton_prefill_fp8", "triton_fp8_common")
ROOT = Path(__file__).resolve().parents[1]


def _source(rev: str, name: str) -> str:
    """tierserve/attention/NAME.py at ``rev`` ('' for the shared blocks at a commit that predates them)."""
    if os.environ.get("FP8_BEFORE_DIR"):
        path = Path(os.environ["FP8_BEFORE_DIR"]) / f"{name}.py"
        return path.read_text() if path.exists() or name != NAMES[-1] else ""
    r = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:tierserve/attention/{name}.py"],
                       capture_output=True, text=True, check=name != NAMES[-1])
    return r.stdout if r.returncode == 0 else ""


def load(rev: str = REV):
    """(paged_decode_fp8, paged_prefill_fp8) of ``rev``, or None when git or the commit is not there."""
    try:
        src = {name: _source(rev, name) for name in NAMES}
    except (OSError, subprocess.CalledProcessError):
        return None
    # the commit's own shared building blocks, so that later changes to them are not timed as "before"
    common = "from tierserve.attention.triton_fp8_common import"
    src = {k: v.replace(common, "from before_fp8_common import") for k, v in src.items()}
    d = Path(tempfile.mkdtemp(prefix="fp8_before_"))
    (d / "before_decode_fp8.py").write_text(src["triton_decode_fp8"])
    (d / "before_fp8_common.py").write_text(src["triton_fp8_common"])
    (d / "before_prefill_fp8.py").write_text(src["triton_prefill_fp8"].replace(
        "from tierserve.attention.triton_decode_fp8 import", "from before_decode_fp8 import"))
    sys.path.insert(0, str(d))      # Triton reads kernel sources from files
    dec, pre = importlib.import_module("before_decode_fp8"), importlib.import_module("before_prefill_fp8")
    return dec.paged_decode_fp8, pre.paged_prefill_fp8
