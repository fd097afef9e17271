"""Where sparse / FP8-KV decode time goes on the GPU (issue 6: at 128k, sparse+FP8 decode was 0.41x dense and
FP8 prefill 6.5x slower). Llama-3.1-8B shape, dummy weights, one context (argv[1], default 32768): per setting,
prefill seconds, decode tok/s, and torch.profiler's top device kernels and host ops of layer 0's attention call
on a real decode step's metadata."""
import os
import sys
import time

import torch

sys.path.insert(0, ".")
from tierserve.bench.sparse_fp8_run import Bench, free_memory  # noqa: E402
from tierserve.bench.sparse_fp8_timing import DecodeMetaCapture  # noqa: E402
from tierserve.bench.sparse_fp8 import Sizes  # noqa: E402

_sync = lambda: torch.cuda.synchronize() if torch.cuda.is_available() else None  # noqa
ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
KVB = int(os.environ.get("KV_BYTES_PER_TOKEN", 131072))
SETTINGS = {"bf16": {}, "fp8-kv": {"kv_dtype": "fp8"}, "sparse": {"sparse_attention": "pages"},
            "sparse+fp8-kv": {"sparse_attention": "pages", "kv_dtype": "fp8"},
            "tiered-sparse": {"sparse_attention": "pages", "gpu_kv_gb": 0.1 * ctx * KVB / 2**30 + 0.3,
                              "cpu_kv_gb": 1.1 * ctx * KVB / 2**30 + 1}}
common = dict(load_format="dummy", device=os.environ.get("DEV", "cuda"), dtype="bfloat16", seed=0, max_num_seqs=1,
              enable_prefix_caching=False, max_model_len=ctx + 64 + 16, max_num_batched_tokens=8192,
              sparse_topk_tokens=2048)
if only is None or len(only) > 1:     # one process per setting: a built engine's memory is never shared
    import subprocess
    for name in (only or SETTINGS):
        subprocess.run([sys.executable, __file__, str(ctx), name], check=False)
    sys.exit(0)
b = Bench(os.environ.get("MODEL") or "llama-3.1-8b", Sizes(), common, 0, print, print)
for name, s in SETTINGS.items():
    if only and name not in only:
        continue
    try:
        llm, build_s = b.build(**s)
    except Exception as e:
        print(name, "build failed:", type(e).__name__, e)
        continue
    eng = llm.engine
    prompt = b.prompt(ctx, eng.model_cfg.vocab_size, 0)
    req, pre = b.prefill(eng, prompt, 40, time.perf_counter() + 200, dense=True)
    out = b.decode(eng, req, time.perf_counter() + 100, attention=False)
    runner = eng.runner
    cap = DecodeMetaCapture(runner)
    cap.armed = True
    req, _ = b.prefill(eng, prompt[: ctx // 2], 3, time.perf_counter() + 200, dense=True)
    while not req.is_finished:
        eng.step()
    cap.close()
    meta = cap.meta
    attn, cfg = runner.model.layers[0].self_attn, runner.model_cfg
    q = torch.randn(meta.num_seqs, cfg.num_heads, cfg.head_dim, device=runner.device, dtype=runner.dtype)
    kvn = torch.zeros(meta.num_seqs, cfg.num_kv_heads, cfg.head_dim, device=runner.device, dtype=runner.dtype)
    layer = runner.kv.layer(0)
    call = lambda: attn.backend.forward(q, kvn, kvn, layer, meta, attn.scale, attn.window, 0, kv_written=True)  # noqa
    with torch.inference_mode():
        for _ in range(3):
            call()
        _sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            _sync()
    print(f"=== {name} ctx {ctx}: prefill {pre:.2f} s, decode {out['tok_s']:.1f} tok/s "
          f"(graphs {runner.graphs is not None}, backend {attn.backend.name})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
    del llm, eng, runner, attn, layer, meta
    free_memory()
