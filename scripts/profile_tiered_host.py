"""Where a tiered sparse decode token's wall time goes outside the GPU's work (bench sparse-fp8 section c's setting at
CONTEXT, default 128k: 10% of the pages on the GPU, the rest in CPU RAM, synthetic fill; FP8 KV unless KV=auto,
FP8 weights with QUANT=fp8; multi-step windows over the tiers with TIERSERVE_TIERED_MULTI_STEP=1).

After 8 warm-up tokens, per token over TOKENS tokens each:
* wall ms a token (a window that the warm-up left queued, computed before the timer, is not counted);
* torch.profiler: GPU busy (kernels + copies) a token, so wall - busy is the time the GPU waits for the host; the
  kernels and host ops with the most time; with STACK=1 the Python stacks of the stream syncs;
* cProfile: the host functions with the most own / cumulative time;
* with SYNCS=1 (CUDA) first the host syncs of TOKENS tokens by their tierserve call sites
  (``torch.cuda.set_sync_debug_mode``; stop 24 found the boolean index of ``SpillState.on_transfers`` this way).
Stop 22 (H200, FP8 KV + FP8 weights, step by step): the step's graph replays in 7.48 ms while a token took 9.40.
Writes $OUT/tiered-host-profile-h200.json (MODEL=<checkpoint> runs it on the CPU: a check of the script)."""
import cProfile
import io
import json
import math
import os
import pstats
import time

import torch

from tierserve import LLM
from tierserve.bench.sparse_fp8_tiers import synthetic_prefill
from tierserve.config import EngineConfig
from tierserve.loader.hf import load_config, resolve_model_path
from tierserve.models.config import ModelConfig
from tierserve.quant.fp8_compact import slot_bytes
from tierserve.runner import multi_step

CONTEXT = int(os.environ.get("CONTEXT", 131072))
KV = os.environ.get("KV", "fp8")
QUANT = os.environ.get("QUANT", "")
TOKENS = int(os.environ.get("TOKENS", 48))
OUT = os.environ.get("OUT", "/tmp")
MODEL = os.environ.get("MODEL", "llama-3.1-8b")
CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _tokens(eng, req, n: int) -> tuple[int, float]:
    """Step until ``n`` more tokens were made (not counting a window already queued); (tokens, seconds)."""
    _sync()
    queued = eng.multi.inflight.steps if eng.multi.inflight is not None else 0
    n0, t = len(req.output_token_ids), time.perf_counter()
    while len(req.output_token_ids) - n0 - queued < n and not req.is_finished:
        eng.step()
    _sync()
    return len(req.output_token_ids) - n0 - queued, time.perf_counter() - t


def _top(events, key: str, n: int, tokens: int) -> list[dict]:
    rows = sorted(((getattr(e, key), e.key, e.count) for e in events if getattr(e, key) > 0), reverse=True)[:n]
    return [{"name": k[:100], "us_per_token": v / tokens, "calls_per_token": c / tokens} for v, k, c in rows]


def _sync_sites(eng, req) -> list[str]:
    """The host syncs of TOKENS tokens (``torch.cuda.set_sync_debug_mode``: every synchronizing call warns), by
    the tierserve frames of the Python stack that made them, the most frequent first."""
    import collections
    import traceback
    import warnings

    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f"{f.filename.split('/tierserve/')[-1]}:{f.lineno}({f.name})" for f in traceback.extract_stack()
                  if "/tierserve/" in f.filename and "/scripts/" not in f.filename]
        sites[" <- ".join(reversed(frames[-5:])) or str(message)[:80]] += 1
    old = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _tokens(eng, req, TOKENS)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
    return [f"x{c}: {s}" for s, c in sites.most_common(30)]


def main() -> None:
    cfg = ModelConfig.from_hf(load_config(resolve_model_path(MODEL)))
    ps, new = 16, 4 * TOKENS + 64
    total = -(-(CONTEXT + new + 16) // ps)
    fp8 = KV == "fp8"
    ecfg = EngineConfig()
    full = -(-ecfg.kv_fp8_keep_sink // ps) + -(-ecfg.kv_fp8_keep_recent // ps) + 2
    gpu = max(4, math.ceil(0.1 * total), 2 * full if fp8 else 0)
    es = 2 if CUDA else 4                                 # bf16 on the GPU, fp32 on the CPU
    row = 2 * cfg.num_layers * (slot_bytes(ps, cfg.num_kv_heads, cfg.head_dim, 1, es) if fp8 else
                                cfg.num_kv_heads * cfg.head_dim * es * (ps + 1))
    chunk = min(8192, (gpu - (full if fp8 else 0)) // 2 * ps)
    torch.manual_seed(0)
    extra = ({"kv_dtype": "fp8"} if fp8 else {}) | ({"quantization": QUANT} if QUANT else {})
    where = {} if CUDA else {"dtype": "float32", "device": "cpu"}
    llm = LLM(MODEL, load_format="dummy", max_num_seqs=1, enable_prefix_caching=False,
              max_model_len=CONTEXT + new + 16, num_kv_pages=gpu,
              cpu_kv_gb=(total - gpu + 64) * row / 2**30, sparse_attention="pages", sparse_topk_tokens=2048,
              max_num_batched_tokens=chunk, **extra, **where)
    eng = llm.engine
    res = {"context": CONTEXT, "kv": KV, "quantization": QUANT or None, "windows": multi_step.TIERED,
           "gpu_pages": gpu, "tokens": TOKENS}
    with torch.inference_mode():
        req = synthetic_prefill(eng, "r", CONTEXT, new, chunk, time.perf_counter() + 300, 0)
        while not req.output_token_ids:
            eng.step()
        _tokens(eng, req, 8)                             # warm-up: graphs captured, placement settles
        n, dt = _tokens(eng, req, TOKENS)
        res["wall_ms_per_token"] = 1e3 * dt / max(n, 1)
        if CUDA and os.environ.get("SYNCS") == "1":
            res["sync_sites"] = _sync_sites(eng, req)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
        stack = os.environ.get("STACK") == "1"
        prof = torch.profiler.profile(activities=acts, with_stack=stack)
        prof.start()
        n, dt = _tokens(eng, req, TOKENS)
        prof.stop()
        res["profiled_wall_ms_per_token"] = 1e3 * dt / max(n, 1)
        if stack:
            # (runtime-API events may carry no Python frames: then the op above them names the caller; stop 23's
            # stacks came back empty, and cProfile's `top_cumulative` answered instead)
            res["syncs"] = [f"x{e.count}: " + (" <- ".join(f for f in e.stack if "tierserve" in f or "scripts" in f)
                                               or " <- ".join(e.stack[:6]) or "(no Python frames)")
                            for e in prof.key_averages(group_by_stack_n=6)
                            if e.key in ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")]
        ev = prof.key_averages()
        dev_key = "device_time_total" if hasattr(ev[0], "device_time_total") else "cuda_time_total"
        self_key = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else "self_cuda_time_total"
        res["gpu_busy_ms_per_token"] = sum(getattr(e, self_key) for e in ev) / 1e3 / max(n, 1)
        res["gpu_kernels"] = _top(ev, dev_key, 20, max(n, 1)) if CUDA else []
        res["host_ops"] = _top(ev, "self_cpu_time_total", 20, max(n, 1))
        del prof, ev
        prof = cProfile.Profile()
        prof.enable()
        n, dt = _tokens(eng, req, TOKENS)
        prof.disable()
        res["cprofiled_wall_ms_per_token"] = 1e3 * dt / max(n, 1)
    res["spilled"], res["step_kinds"] = eng.kv.num_spilled, dict(getattr(eng.runner, "step_kinds", {}))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1))
    for k in ("gpu_kernels", "host_ops"):
        for r in res[k][:12]:
            print(f"  {k[:4]} {r['us_per_token']:9.1f} us/tok x {r['calls_per_token']:6.2f}  {r['name']}")
    for s in res.get("sync_sites", []):
        print("  sync", s)
    for s in res.get("syncs", []):
        print("  sync", s)
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(24)
        text = s.getvalue()
        res[f"top_{key}"] = text
        print(text[text.find("ncalls") - 1:])
    name = "tiered-host-profile" + ("-windows" if multi_step.TIERED else "") + ("-fp8w" if QUANT else "")
    with open(f"{OUT}/{name}-h200.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
