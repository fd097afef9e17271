"""Quick GPU check: graphs vs eager equality on a small model, then 8B-shape decode speed (tierserve only)."""
import json, os, sys, time
import torch
from tierserve import LLM, SamplingParams
from tierserve.bench.decode import DecodeCase, run_tierserve, _prompts

out = {}
# 1. equality: CUDA graphs vs eager, triton vs torch_ref, bf16, nano-shaped dummy
cfgdir = "/tmp/smallcfg"; os.makedirs(cfgdir, exist_ok=True)
json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}, open(cfgdir + "/config.json", "w"))
prompts = [[5 + (i * 7 + j * 13) % 4000 for j in range(30 + 50 * i)] for i in range(6)]
sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
toks = {}
for name, kw in {"graphs": {}, "eager": {"enforce_eager": True}, "ref": {"attention_backend": "torch_ref"}}.items():
    llm = LLM(cfgdir, load_format="dummy", max_model_len=1024, max_num_seqs=8, seed=1, **kw)
    toks[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    del llm
out["graphs_eq_eager"] = toks["graphs"] == toks["eager"]
out["triton_eq_ref"] = sum(a == b for a, b in zip(toks["eager"], toks["ref"]))
print("equality", out, flush=True)
torch.cuda.empty_cache()
# 2. 8B decode speed
llm = LLM("llama-3.1-8b", load_format="dummy", max_model_len=4096, max_num_seqs=64, gpu_memory_utilization=0.5)
print("pages", llm.engine.runner.num_pages, flush=True)
for b, c in [(1, 2048), (16, 2048), (64, 2048)]:
    case = DecodeCase(b, c, 64)
    p = _prompts(case, 128256, 0)
    run_tierserve(llm, DecodeCase(b, c, 8), p)
    r = run_tierserve(llm, case, p); r.pop("tokens")
    print(b, c, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    out[f"b{b}_c{c}"] = r
if os.environ.get("PROFILE") != "1":
    json.dump(out, open(os.environ.get("OUT", "/tmp") + "/smoke.json", "w"), default=str, indent=1)
    sys.exit(0)
from torch.profiler import profile, ProfilerActivity
case = DecodeCase(1, 2048, 16)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    run_tierserve(llm, case, _prompts(case, 128256, 1))
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/smoke.json", "w"), default=str, indent=1)
