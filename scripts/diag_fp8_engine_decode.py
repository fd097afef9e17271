"""Why the engine's FP8 decode kernel at 2k took 22.5 us a layer (stop 19 profile) against ~10 us in
``bench_fp8_kv.py --compact --layers 32``: capture the engine's own 32 launches of one decode step (arguments as
the runner passes them), then time them with CUDA events (32 layers in turn, every read from HBM) as they are and
with one thing changed at a time:

* ``engine``: the captured calls;
* ``small pool``: the compact pages copied into a fresh pool of just their slots (the micro-benchmark's storage;
  the engine's pool spans most of the GPU's memory, each slot's layer ~1.1 MB apart);
* ``q contiguous``: the query as a fresh contiguous tensor (the engine's is a view of the qkv output);
* ``exact splits``: num_splits from the request's real length (the graphs' is fixed at capture for max_model_len);
* ``seq_len n``: the keep_recent edge on a page boundary (2048) or inside a page (with the token-level rule of
  stop 19: the fix-up branch); 2073: a full-precision page read in FP8 (storage lagging the rule, as inside
  multi-step windows: the fix-up branch with the page-level rule).

Prints the page mix of the table (compact / full precision / stored flags) and a table; writes JSON to $OUT."""
import json
import os
import sys

import torch

sys.path.insert(0, ".")
import tierserve.attention.triton_fp8_steps as steps  # noqa: E402
from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.attention.backend import choose_splits  # noqa: E402
from tierserve.attention.fp8_decode_config import SPLITS  # noqa: E402
from tierserve.bench.gpu_timer import graph_time_us  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
CONTEXT = int(os.environ.get("CONTEXT", 2048))


def timed(calls, reps=30):
    """us per call: the calls captured in one CUDA graph (as the engine replays them; timed eagerly from Python
    the launches' host time dominates), median of ``reps`` replays. (Zeroing a 96 MB buffer between calls to
    evict L2 was tried: the flush's dirty lines written back during the next call made it unrepresentative.)"""
    def body():
        for c in calls:
            c()
    return graph_time_us(body, reps=1, runs=reps) / len(calls)


def main() -> None:
    llm = LLM("llama-3.1-8b", load_format="dummy", dtype="bfloat16", seed=0, max_num_seqs=1,
              max_model_len=CONTEXT + 256, enable_prefix_caching=False, kv_dtype="fp8")
    eng = llm.engine
    vocab = eng.model_cfg.vocab_size
    llm.generate([[(i * 7919 + 1) % vocab for i in range(CONTEXT)]],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    graphs = eng.runner.graphs
    captured = []
    real = steps.paged_decode_fp8

    def spy(*a, **kw):
        captured.append((a, dict(kw)))
        return real(*a, **kw)
    steps.paged_decode_fp8 = spy
    graphs._forward(graphs.bucket_for(1), False)
    torch.cuda.synchronize()
    steps.paged_decode_fp8 = real
    assert len(captured) == 32, len(captured)
    a0, kw0 = captured[0]
    q, kv_layer, quantised, table, seq_lens = a0[:5]
    seq = int(seq_lens[0])
    cpool, cbase = kw0["compact"]
    row = table[0, : -(-seq // 16)].tolist()
    n_compact = sum(1 for p in row if p >= cbase)
    flags = quantised[torch.tensor(row, device=quantised.device)].tolist()
    info = {"seq_len": seq, "table_shape": list(table.shape), "table_dtype": str(table.dtype),
            "q_shape": list(q.shape), "q_stride": list(q.stride()), "kwargs": {k: v for k, v in kw0.items()
                                                                                 if k not in ("compact", "out")},
            "pages": len(row), "compact_pages": n_compact, "stored_flags": sum(flags),
            "compact_pool_shape": list(cpool.shape), "compact_pool_stride": list(cpool.stride()),
            "kv_layer_stride": list(kv_layer.stride()), "page_ids": row[:4] + ["..."] + row[-4:]}
    print(json.dumps(info))

    def call(a, kw, **over):
        kw = {**kw, **over}
        kw.pop("out", None)
        return lambda: real(*a, **kw)
    results = {"engine": timed([call(a, kw) for a, kw in captured])}
    # small pool: the request's compact slots copied to a fresh pool, table remapped
    slots = sorted({p for p in row if p >= cbase})
    remap = {p: cbase + j for j, p in enumerate(slots)}
    small_tab = table.clone()
    small_tab[0, : len(row)] = torch.tensor([remap.get(p, p) for p in row], device=table.device, dtype=table.dtype)
    small_calls = []
    for a, kw in captured:
        pool_l, base = kw["compact"]
        fresh = pool_l[torch.tensor([p - base for p in slots], device=pool_l.device)].clone()
        a2 = (*a[:3], small_tab, *a[4:])
        small_calls.append(call(a2, kw, compact=(fresh, base)))
    results["small pool"] = timed(small_calls)
    results["q contiguous"] = timed([call((a[0].clone(), *a[1:]), kw) for a, kw in captured])
    exact = choose_splits(1, kv_layer.shape[3], seq, torch.cuda.get_device_properties(0).multi_processor_count,
                          **SPLITS)
    results[f"exact splits ({exact})"] = timed([call(a, kw, num_splits=exact) for a, kw in captured])
    results["1 stage"] = timed([call(a, kw, num_stages=1) for a, kw in captured])
    results["8 warps"] = timed([call(a, kw, num_warps=8) for a, kw in captured])
    for n in (2048, 2049, 2056, 2073):     # 2073: page 124 (full precision) read in FP8, quantised on the fly    # where the keep_recent edge falls: on a page boundary or inside a page
        lens = torch.full_like(seq_lens, n)
        results[f"seq_len {n}"] = timed([call((*a[:4], lens, *a[5:]), kw) for a, kw in captured])
    for name, us in results.items():
        print(f"{name:24s} {us:8.2f} us a layer")
    with open(f"{OUT}/diag-fp8-engine-decode-h200.json", "w") as f:
        json.dump({"info": info, "us_per_layer": results}, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
