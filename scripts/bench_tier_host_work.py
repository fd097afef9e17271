"""Per-step host work of tiered sparse decode on the CPU (stop 18): the time of ``KVManager.rebalance`` (promote /
demote spilled pages) and of ``runner.step_inputs.prepare_step`` (page tables to arrays) for one request whose
pages mostly sit in the CPU tier (10% on the device), tiny Llama, sparse "pages" attention, FP8 KV.

Each ``--trees name=DIR`` (a checkout of the project) runs in its own process with ``PYTHONPATH=DIR``, so a
baseline commit and the current tree are timed in the same run; ``--contexts`` (default 131072,1048576). Prints a
table; ``--output`` writes JSON. Mean (a step's share of the every-16-steps demotion pass), median and max
of ``--reps`` calls each. The selection counts of the spilled slots are set at random (uniform 0-3) so
that promotions happen (other slots 0)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r'''
import json, statistics, sys, tempfile, time
from pathlib import Path
import torch
from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM
from tierserve.bench.sparse_fp8_tiers import synthetic_prefill
from tierserve.runner.step_inputs import prepare_step

ctx, reps = int(sys.argv[1]), int(sys.argv[2])
ck = make_checkpoint(Path(tempfile.mkdtemp()) / "m", "llama", num_hidden_layers=2)
ps = 16
total = -(-(ctx + 64 + 16) // ps)
gpu = max(total // 10, 64)
llm = LLM(str(ck), device="cpu", dtype="float32", max_num_seqs=1, enable_prefix_caching=False, kv_dtype="fp8",
          max_model_len=ctx + 80, num_kv_pages=gpu, cpu_kv_gb=(total - gpu + 16) * 2 * 2 * 4 * 16 * 17 * 4 * 2 / 2**30,
          sparse_attention="pages", sparse_topk_tokens=256, max_num_batched_tokens=(gpu - 16) // 2 * ps)
eng = llm.engine
with torch.inference_mode():
    req = synthetic_prefill(eng, "r", ctx, 60, (gpu - 16) // 2 * ps, time.perf_counter() + 1800, 0)
    while not req.output_token_ids:
        eng.step()
    for _ in range(3):
        eng.step()
    heat = eng.runner.spill.host_heat
    spilled = torch.tensor([-p - 1 for p in eng.kv.page_table("r") if p < 0])
    heat[spilled] = torch.rand(len(spilled), generator=torch.Generator().manual_seed(0)) * 3
    def times(fn):
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); fn(); ts.append((time.perf_counter() - t) * 1e3)
        return statistics.mean(ts), statistics.median(ts), max(ts)
    free0 = eng.kv.pool.num_free
    rb = times(lambda: eng.kv.rebalance(1))
    so = eng.scheduler.schedule()
    pr = times(lambda: prepare_step(eng.runner, so))
print(json.dumps({"context": ctx, "pages": total, "device_pages": gpu, "free_device_pages": free0,
                  "spilled": eng.kv.num_spilled, "promoted": eng.kv.num_promoted, "demoted": eng.kv.num_demoted,
                  "rebalance_ms_mean": rb[0], "rebalance_ms_median": rb[1], "rebalance_ms_max": rb[2],
                  "prepare_step_ms_mean": pr[0], "prepare_step_ms_median": pr[1], "prepare_step_ms_max": pr[2]}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", required=True, help="name=DIR,... (checkouts to time; the first is the baseline)")
    ap.add_argument("--contexts", default="131072,1048576")
    ap.add_argument("--reps", type=int, default=32)
    ap.add_argument("--output")
    a = ap.parse_args()
    trees = [t.split("=", 1) for t in a.trees.split(",")]
    rows = []
    for ctx in [int(c) for c in a.contexts.split(",")]:
        for name, tree in trees:
            commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(ctx), str(a.reps)], cwd=tree, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": tree})
            if out.returncode:
                sys.exit(f"{name} at {ctx}: {out.stderr[-2000:]}")
            row = {"tree": name, "commit": commit, **json.loads(out.stdout.strip().splitlines()[-1]),
                   "wall_s": time.perf_counter() - t}
            rows.append(row)
            print(f"{name:8s} {commit} ctx {ctx:8d}: rebalance mean {row['rebalance_ms_mean']:.3f} ms (median "
                  f"{row['rebalance_ms_median']:.3f}, max {row['rebalance_ms_max']:.3f}), prepare_step mean "
                  f"{row['prepare_step_ms_mean']:.3f} ms; promoted {row['promoted']}, demoted {row['demoted']}",
                  flush=True)
    if a.output:
        meta = {"machine": "CPU (the development machine: 2 cores)", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                time.gmtime()), "reps": a.reps, "model": "tiny Llama, 2 layers", "kv_dtype": "fp8",
                "sparse_topk_tokens": 256, "device_share": 0.1}
        with open(a.output, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
