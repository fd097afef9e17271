"""Merge `tierserve bench sparse-fp8` results of separate runs (whole sections from one run each) into one JSON +
plot (``tierserve.bench.sparse_fp8.merge_sparse_fp8``: rows name their source file; a section found twice is refused).

    python scripts/merge_sparse_fp8.py OUT.json A.json B.json C128K.json C1M.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tierserve.bench.results import write_result
from tierserve.bench.sparse_fp8 import merge_sparse_fp8, plot_sparse_fp8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("inputs", type=Path, nargs="+")
    a = ap.parse_args()
    result = merge_sparse_fp8([(p.name, json.loads(p.read_text())) for p in a.inputs])
    write_result(result, a.output)
    plot_sparse_fp8(result, a.output.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
