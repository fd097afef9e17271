"""The ``--cpu-experts`` row of ``bench deepseek-v4``: the same model with its routed experts in CPU RAM (computed
on the host, docs/deepseek_v4.md), decode tok/s, TTFT and peak GPU memory at one context, against the
all-device row of the same run. Random weights are drawn on the CPU in that placement, so its greedy tokens are
not compared with the other rows'."""
from __future__ import annotations

import time
from pathlib import Path

import torch


def run_cpu_experts(folder: Path, context: int, prompt: list[int], new: int, *, chunk: int, device: str,
                    dtype: str, seed: int, max_len: int, budget_s: float, run, free, collect) -> dict:
    """Build the engine with ``cpu_experts=True`` from ``folder``'s config, run ``prompt`` through ``run`` (the
    bench's ``_run_ours``) and free it; returns the row's fields (or {"error"/"skipped": ...})."""
    from tierserve import LLM

    t0 = time.perf_counter()
    try:
        llm = LLM(str(folder), load_format="dummy", device=device, dtype=dtype, seed=seed, max_num_seqs=1,
                  max_model_len=max_len, max_num_batched_tokens=chunk, enable_prefix_caching=False,
                  num_kv_pages=-(-max_len // 16) + 1, page_size=16, cpu_experts=True)
    except (RuntimeError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
    eng = llm.engine
    model = eng.runner.model
    dev = eng.runner.device
    on_dev = sum(p.nbytes for p in model.parameters() if p.device.type == dev.type)
    on_host = sum(p.nbytes for p in model.parameters() if p.device.type == "cpu") if dev.type != "cpu" else None
    build_s = time.perf_counter() - t0
    try:
        run(eng, len(prompt[:64]), prompt[:64], 2, float("inf"))          # warm-up
        r = run(eng, context, prompt, new, time.perf_counter() + budget_s)
    except RuntimeError as e:
        r = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
    r.pop("tokens", None)
    r.update(cpu_experts=True, build_s=build_s, weights_on_device_gib=on_dev / 2**30,
             weights_on_host_gib=None if on_host is None else on_host / 2**30)
    free(model)
    del eng, llm, model
    collect(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return r
