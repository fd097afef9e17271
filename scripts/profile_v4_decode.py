"""Where a DeepSeek-V4-Flash decode step's time goes on the GPU (issue 7: the 4-layer model decodes at ~0.26
of its bandwidth bound; the batch-1 graph replay alone is ~3 ms). Builds the shipped config cut to LAYERS
(default 4) with dummy bf16 weights, runs one CONTEXT-token request (default 4096) so the slot graphs are
captured, then:

* the step time: median of CUDA-event-timed replays of the batch-1 graph (free slots, whole context limit);
* the kernels: torch.profiler over eager runs of the captured forward (``SlotDecoder._forward``, the graph's
  kernels), grouped by kind, per step;
* the bound: bytes a batch-1 step reads (``bench.deepseek_v4.decode_read_bytes``) / the copy bandwidth.

Writes $OUT/decode-profile-v4-h200.json and prints a table. ``--smoke``-style check on the CPU is not
possible (the slot graphs need CUDA)."""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, ".")
from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.bench.decode import copy_bandwidth  # noqa: E402
from tierserve.bench.deepseek_v4 import bench_config, decode_read_bytes  # noqa: E402
from tierserve.bench.gpu_timer import device_kernels  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
LAYERS = int(os.environ.get("LAYERS", 4))
CONTEXT = int(os.environ.get("CONTEXT", 4096))
STEPS = 10
KINDS = [("moe experts", ("gate_up", "_down", "moe", "routed")),
         ("mhc", ("mhc", "sinkhorn")),
         ("attention", ("attn", "flash", "decode", "merge", "sparse", "window")),
         ("indexer / compressor", ("index", "topk", "compress", "pool")),
         ("gemv/gemm", ("gemv", "gemm", "cutlass", "sm90", "nvjet", "matmul", "splitk")),
         ("norm", ("rms", "norm")), ("rotary", ("rope", "rotary")),
         ("activation", ("silu", "softplus", "sigmoid", "act")),
         ("copy/index", ("copy", "index", "gather", "scatter", "fill", "cat", "where")),
         ("argmax/sampling", ("argmax", "max", "sort"))]


def main() -> None:
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    folder = Path(tempfile.mkdtemp(prefix="v4-profile-"))
    (folder / "config.json").write_text(json.dumps(bench_config("deepseek-v4-flash", LAYERS, False)))
    max_len = CONTEXT + 64
    llm = LLM(str(folder), load_format="dummy", dtype="bfloat16", seed=0, max_num_seqs=1, max_model_len=max_len,
              max_num_batched_tokens=8192, enable_prefix_caching=False, num_kv_pages=-(-max_len // 16) + 1,
              page_size=16)
    eng = llm.engine
    model, slots = eng.runner.model, getattr(eng.runner, "slots", None)
    prompt = torch.randint(3, 1000, (CONTEXT,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    state = eng.runner.state_bytes() if hasattr(eng.runner, "state_bytes") else 0
    read = decode_read_bytes(model, state)
    if slots is None or not slots.graphs:
        sys.exit("no slot graphs in this engine")
    replay_ms = slots.time_replay(1)
    lim = slots.limits[-1]
    with torch.inference_mode():
        for _ in range(3):
            slots._forward(1, lim)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                slots._forward(1, lim)
            torch.cuda.synchronize()
    ks, by_kind = device_kernels(prof, KINDS, STEPS)
    total = sum(by_kind.values())
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "layers": LAYERS,
              "context": CONTEXT, "copy_bandwidth_GBps": bw / 1e9, "decode_read_bytes": read,
              "bound_ms": read / bw * 1e3, "replay_ms": replay_ms, "bound_frac": read / bw * 1e3 / replay_ms,
              "kernel_us_sum_eager": total, "kernel_launches": sum(k["calls"] for k in ks), "by_kind_us": by_kind,
              "by_kind_share": {k: v / total for k, v in by_kind.items()}, "top_kernels": ks[:30]}
    print(f"V4 {LAYERS} layers, ctx {CONTEXT}: replay {replay_ms:.3f} ms, bound {result['bound_ms']:.3f} ms "
          f"({result['bound_frac']:.2f}); kernels {total / 1e3:.3f} ms in {result['kernel_launches']:.0f} launches")
    for k, v in by_kind.items():
        print(f"   {k:22s} {v:9.1f} us  {v / total:6.1%}")
    for k in ks[:15]:
        print(f"   {k['us']:9.1f} us x{k['calls']:5.0f}  {k['kernel'][:90]}")
    with open(f"{OUT}/decode-profile-v4-h200.json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {OUT}/decode-profile-v4-h200.json")


if __name__ == "__main__":
    main()
