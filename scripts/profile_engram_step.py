"""Where the batch-1 decode time of an Engram model goes on the GPU (issue 9: Engram costs ~2.4 ms per token
against the same graphs path without it). Llama-3.1-8B shape, dummy weights, Engram at layers 1 and 15
(1B table parameters, device placement unless argv[1] == "cpu"); times each runner phase with CUDA syncs
and prints torch.profiler's top host and device ops for 16 decode steps."""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.bench.engram import engram_config  # noqa: E402

placement = sys.argv[1] if len(sys.argv) > 1 else "device"
cfg = json.loads(Path("tierserve/assets/configs/llama-3.1-8b/config.json").read_text())
cfg["engram"] = engram_config((1, 15), 1e9, 8, 64, placement=placement)[0].to_dict()
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "config.json").write_text(json.dumps(cfg))
    llm = LLM(tmp, load_format="dummy", enable_prefix_caching=False, max_model_len=2048, max_num_seqs=8)
    runner = llm.engine.runner
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    llm.generate([list(range(100, 612))], sp)                       # warm-up
    phases = {"engram_step": 0.0, "fill": 0.0, "replay": 0.0, "n": 0}
    eng = runner.graphs.engram     # StaticEngramRows (copy gathers) fills rows before each replay; DeviceEngram
    real_step, real_fill, real_run = runner._engram_step, getattr(eng, "fill", None), runner.graphs.run

    def timed(name, fn):
        def wrap(*a, **kw):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = fn(*a, **kw)
            torch.cuda.synchronize()
            phases[name] += time.perf_counter() - t
            phases["n"] += name == "replay"
            return r
        return wrap
    runner._engram_step = timed("engram_step", real_step)
    if real_fill is not None:
        eng.fill = timed("fill", real_fill)
    runner.graphs.run = timed("replay", real_run)
    t = time.perf_counter()
    out = llm.generate([list(range(100, 612))], sp)[0]
    total = time.perf_counter() - t
    n = max(1, phases["n"])
    print(f"{placement}: {len(out.outputs[0].token_ids) / total:.1f} tok/s end to end; per decode step (ms): "
          + ", ".join(f"{k} {1e3 * v / n:.3f}" for k, v in phases.items() if k != "n"))
    runner._engram_step, runner.graphs.run = real_step, real_run
    if real_fill is not None:
        eng.fill = real_fill
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([list(range(100, 612))], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
