"""Where a tiered sparse decode step's wall time goes outside its CUDA graph (bench sparse-fp8 section c's
setting at CONTEXT, default 128k: 10% of the pages on the GPU, the rest in CPU RAM, synthetic fill, FP8 KV unless
KV=auto). Per decode step: the host's wall time and the GPU time between CUDA events around ``eng.step()``; then
cProfile over STEPS more steps (top functions by own and cumulative time). Prints only; writes
$OUT/tiered-host-profile-h200.json (the step times and the top functions)."""
import cProfile
import io
import json
import math
import os
import pstats
import statistics
import time

import torch

from tierserve import LLM
from tierserve.bench.sparse_fp8_tiers import synthetic_prefill
from tierserve.config import EngineConfig
from tierserve.loader.hf import load_config, resolve_model_path
from tierserve.models.config import ModelConfig
from tierserve.quant.fp8_compact import slot_bytes

CONTEXT = int(os.environ.get("CONTEXT", 131072))
KV = os.environ.get("KV", "fp8")
STEPS = int(os.environ.get("STEPS", 48))
OUT = os.environ.get("OUT", "/tmp")
MODEL = "llama-3.1-8b"


def main() -> None:
    cfg = ModelConfig.from_hf(load_config(resolve_model_path(MODEL)))
    ps, new = 16, 2 * STEPS + 16
    total = -(-(CONTEXT + new + 16) // ps)
    fp8 = KV == "fp8"
    ecfg = EngineConfig()
    full = -(-ecfg.kv_fp8_keep_sink // ps) + -(-ecfg.kv_fp8_keep_recent // ps) + 2
    gpu = max(4, math.ceil(0.1 * total), 2 * full if fp8 else 0)
    row = 2 * cfg.num_layers * (slot_bytes(ps, cfg.num_kv_heads, cfg.head_dim, 1, 2) if fp8 else
                                cfg.num_kv_heads * cfg.head_dim * 2 * (ps + 1))
    chunk = min(8192, (gpu - (full if fp8 else 0)) // 2 * ps)
    torch.manual_seed(0)
    llm = LLM(MODEL, load_format="dummy", max_num_seqs=1, enable_prefix_caching=False,
              max_model_len=CONTEXT + new + 16, num_kv_pages=gpu,
              cpu_kv_gb=(total - gpu + 12) * row / 2**30, sparse_attention="pages", sparse_topk_tokens=2048,
              max_num_batched_tokens=chunk, **({"kv_dtype": "fp8"} if fp8 else {}))
    eng = llm.engine
    with torch.inference_mode():
        req = synthetic_prefill(eng, "r", CONTEXT, new, chunk, time.perf_counter() + 300, 0)
        while not req.output_token_ids:
            eng.step()
        for _ in range(8):                     # warm-up: graphs captured
            eng.step()
        torch.cuda.synchronize()
        walls, gpus = [], []
        for _ in range(STEPS):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            a.record()
            eng.step()
            b.record()
            b.synchronize()
            walls.append((time.perf_counter() - t) * 1e3)
            gpus.append(a.elapsed_time(b))
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for _ in range(STEPS - 8):
            eng.step()
        torch.cuda.synchronize()
        prof.disable()
        prof_ms = (time.perf_counter() - t) * 1e3 / (STEPS - 8)
    res = {"context": CONTEXT, "kv": KV, "gpu_pages": gpu, "steps": STEPS, "spilled": eng.kv.num_spilled,
           "wall_ms_median": statistics.median(walls), "gpu_ms_median": statistics.median(gpus),
           "profiled_ms_per_step": prof_ms, "step_kinds": dict(getattr(eng.runner, "step_kinds", {}))}
    print(json.dumps(res, indent=1))
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(28)
        text = s.getvalue()
        res[f"top_{key}"] = text
        print(text[text.find("ncalls") - 1:])
    with open(f"{OUT}/tiered-host-profile-h200.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
