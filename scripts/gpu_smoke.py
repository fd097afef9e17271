"""Quick GPU check: graphs vs eager equality on a small model, then 8B-shape decode speed (tierserve only),
graph-replay time per bucket (GPU time without the engine's Python) and an optional profile."""
import gc, json, os
import torch
from tierserve import LLM, SamplingParams
from tierserve.bench.decode import DecodeCase, run_tierserve, _prompts, copy_bandwidth

OUT = os.environ.get("OUT", "/tmp")
out = {}
# 1. equality on the embedded nano model (trained weights: clear argmax margins): CUDA graphs vs eager vs
# the torch reference backend, multi-step vs one step, fused vs plain small ops; fp32 and bf16
prompts = ["The history of the city", "Once upon a time", "In mathematics, a prime number", "def main():"] * 2
sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
variants = {"graphs": {}, "graphs_1step": {"num_scheduler_steps": 1}, "eager": {"enforce_eager": True},
            "unfused": {"fused_ops": False}, "ref": {"attention_backend": "torch_ref"}}
for dtype in ("float32", "bfloat16"):
    toks = {}
    for name, kw in variants.items():
        llm = LLM(None, max_model_len=1024, max_num_seqs=8, num_kv_pages=1024, dtype=dtype, **kw)
        toks[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        del llm; gc.collect(); torch.cuda.empty_cache()
    eq = {name: sum(a == b for a, b in zip(t, toks["graphs_1step"])) for name, t in toks.items()}
    out[f"equal_to_graphs_1step_{dtype}"] = eq
    print(dtype, "sequences equal to graphs_1step (of 8):", eq, flush=True)
torch.cuda.empty_cache()
dev = torch.device("cuda")
out["copy_bw_GBps"] = copy_bandwidth(dev) / 1e9
# 2. 8B decode speed, fused small ops on and off; graph replay alone = GPU time of one decode step
for variant in ("fused", "steps1"):
    llm = LLM("llama-3.1-8b", load_format="dummy", max_model_len=int(os.environ.get("MAXLEN", 4096)),
              max_num_seqs=64, gpu_memory_utilization=0.5, num_scheduler_steps=8 if variant == "fused" else 1)
    r = llm.engine.runner
    print(variant, "pages", r.num_pages, "graphs", r.graphs is not None, "bw", out["copy_bw_GBps"], flush=True)
    for b, c in [(1, 2048), (16, 2048), (64, 2048)]:
        case = DecodeCase(b, c, 48)
        p = _prompts(case, 128256, 0)
        run_tierserve(llm, DecodeCase(b, c, 4), p)
        res = run_tierserve(llm, case, p); res.pop("tokens")
        print(variant, b, c, {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}, flush=True)
        out[f"{variant}_b{b}_c{c}"] = res
    if r.graphs is not None:
        for b in (1, 16, 64):
            bb = r.graphs.bucket_for(b)
            g = r.graphs.graphs[bb]
            for _ in range(5):
                g.replay()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(30):
                s.record(); g.replay(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
            ts.sort()
            out[f"{variant}_replay_ms_b{bb}"] = ts[len(ts) // 2]
            print(variant, "replay bucket", bb, "median ms", round(ts[len(ts) // 2], 4), flush=True)
    if variant == "fused" and os.environ.get("PROFILE") == "1":
        from torch.profiler import profile, ProfilerActivity
        case = DecodeCase(1, 2048, 16)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_tierserve(llm, case, _prompts(case, 128256, 1))
        with open(OUT + "/profile.txt", "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
            f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    if os.environ.get("ONLY_FUSED") == "1":
        break
    del llm, r; gc.collect(); torch.cuda.empty_cache()
json.dump(out, open(OUT + "/smoke.json", "w"), default=str, indent=1)
