"""Decode benchmark: tierserve and Hugging Face transformers on the same weights, in the same run.

For each (batch, context): prompts of ``context`` random token ids, ``new_tokens`` greedy tokens.
TTFT = time until every request has its first token; decode tok/s = batch * (new_tokens - 1) /
time of the remaining steps. Both engines get identical weights: transformers' model is built (from
the checkpoint or, with --load-format dummy, randomly from config.json) and its state dict is
copied into ours.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from tierserve.bench.results import make_result


@dataclass
class DecodeCase:
    batch: int
    context: int
    new_tokens: int


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _prompts(case: DecodeCase, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (case.batch, case.context), generator=g).tolist()


def run_tierserve(llm, case: DecodeCase, prompts) -> dict:
    from tierserve import SamplingParams

    eng = llm.engine
    dev = eng.runner.device
    sp = SamplingParams(temperature=0, max_tokens=case.new_tokens, ignore_eos=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"b{i}", p, sp)
    got_first: set[str] = set()
    done: dict[str, list[int]] = {}
    step_times, t_first = [], None
    while eng.has_unfinished_requests():
        ts = time.perf_counter()
        outs = eng.step()
        if t_first is not None:
            step_times.append(time.perf_counter() - ts)
        for o in outs:
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        if t_first is None:
            got_first = {rid for rid, r in eng.requests.items() if r.output_token_ids} | set(done)
        if t_first is None and len(got_first) == len(prompts):
            _sync(dev)
            t_first = time.perf_counter()
    _sync(dev)
    t_end = time.perf_counter()
    decode_s = t_end - t_first
    n_dec = case.batch * (case.new_tokens - 1)
    return {"engine": "tierserve", "tok_s": n_dec / decode_s if decode_s > 0 else float("nan"),
            "ms_per_token": 1e3 * decode_s / max(case.new_tokens - 1, 1), "ttft_s": t_first - t0,
            # an engine step returns up to num_scheduler_steps tokens per request (one host sync)
            "median_ms_per_engine_step": 1e3 * statistics.median(step_times) if step_times else None,
            "engine_steps": len(step_times),
            "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "tokens": [done[f"b{i}"] for i in range(len(prompts))]}


def plain_tokens(llm, case: DecodeCase, prompts, max_new: int = 32) -> list[list[int]]:
    """Greedy tokens of the plain path on the same engine and weights: no CUDA graphs, one step per
    host round trip (the first ``max_new`` tokens)."""
    eng = llm.engine
    graphs, steps = eng.runner.graphs, eng.config.num_scheduler_steps
    eng.runner.graphs, eng.config.num_scheduler_steps = None, 1
    try:
        small = DecodeCase(case.batch, case.context, min(case.new_tokens, max_new))
        return run_tierserve(llm, small, prompts)["tokens"]
    finally:
        eng.runner.graphs, eng.config.num_scheduler_steps = graphs, steps


@torch.inference_mode()
def run_transformers(model, case: DecodeCase, prompts, **generate_kw) -> dict:
    """``generate_kw`` go to ``generate`` (e.g. ``cache_implementation="offloaded"``)."""
    dev = next(model.parameters()).device
    ids = torch.tensor(prompts, device=dev)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True, **generate_kw)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    _sync(dev)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, **kw)
    _sync(dev)
    total = time.perf_counter() - t0
    decode_s = max(total - ttft, 1e-9)
    n_dec = case.batch * (case.new_tokens - 1)
    return {"engine": "transformers", "tok_s": n_dec / decode_s,
            "ms_per_token": 1e3 * decode_s / max(case.new_tokens - 1, 1), "ttft_s": ttft,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "tokens": out[:, ids.shape[1]:].tolist()}


def copy_bandwidth(dev: torch.device, nbytes: int = 1 << 31) -> float:
    """Memory bandwidth from a device-to-device copy, bytes read + written per second (DESIGN.md's
    4.15 TB/s on the H200 counts both)."""
    nbytes = nbytes if dev.type == "cuda" else nbytes // 8
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        _sync(dev)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def untied_embedding_bytes(model) -> int:
    """Bytes of an input embedding table that is not also the output head: a decode step reads one row of
    it, yet DESIGN.md's roofline (``roofline_frac``) counts every parameter; ``roofline_frac_bytes_read``
    leaves it out."""
    emb = getattr(model, "embed_tokens", None)
    if emb is None or getattr(model, "lm_head", None) is None:
        return 0
    return emb.weight.numel() * emb.weight.element_size()


def roofline_frac(tok_s: float, batch: int, context: int, new_tokens: int, weight_bytes: int,
                  kv_bytes_per_token: int, bandwidth: float) -> float:
    """(bytes a decode step must read: all weights + every sequence's KV, at the mean context of the
    timed steps) / bandwidth, divided by the measured step time."""
    step_s = batch / tok_s
    kv = batch * (context + new_tokens / 2) * kv_bytes_per_token
    return (weight_bytes + kv) / bandwidth / step_s


def _feasible(model, cases: list[DecodeCase], device: str, num_engines: int):
    """Drop the cases whose KV cache cannot fit beside the weights of every engine on this GPU (both
    engines hold their own copy); they are reported as skipped rows, not silently left out."""
    from tierserve.loader.hf import load_config, resolve_model_path
    from tierserve.models.config import ModelConfig

    if not (torch.cuda.is_available() and device in ("auto", "cuda")):
        return [], cases
    cfg = ModelConfig.from_hf(load_config(resolve_model_path(model)))
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2           # bf16 K and V
    weights = 2 * cfg.num_params()
    total = torch.cuda.mem_get_info()[1]
    # per engine: its share of 90% of the card after every engine's weights and 8 GiB of activations
    budget = (0.9 * total - num_engines * weights - 8 * 2**30) / num_engines
    keep, skipped = [], []
    for c in cases:
        need = c.batch * (c.context + c.new_tokens) * kv_per_token
        if need <= budget:
            keep.append(c)
        else:
            skipped.append({"batch": c.batch, "context": c.context, "new_tokens": c.new_tokens,
                            "skipped": f"needs {need / 2**30:.1f} GiB of KV per engine; "
                                       f"{max(budget, 0) / 2**30:.1f} GiB fit beside the weights"})
    return skipped, keep


def _hf_model(path, load_format: str, dev: torch.device, dtype: torch.dtype):
    import transformers

    if load_format == "dummy":
        cfg = transformers.AutoConfig.from_pretrained(path)
        with torch.device(dev):
            hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev)
    return hf.eval()


def bench_decode(model: str | None, cases: list[DecodeCase], *, load_format: str = "auto",
                 device: str = "auto", dtype: str = "auto", engines=("tierserve", "transformers"),
                 seed: int = 0, repeats: int = 1, progress=None) -> dict:
    from tierserve import LLM
    from tierserve.loader.hf import resolve_model_path

    skipped, cases = _feasible(model, cases, device, len(engines))
    if not cases:
        raise ValueError("no case fits in this device's memory: " + "; ".join(r["skipped"] for r in skipped))
    max_len = max(c.context + c.new_tokens for c in cases)
    max_batch = max(c.batch for c in cases)
    # a KV pool just large enough for the largest case, so the transformers baseline fits beside it
    pages = max(c.batch * -(-(c.context + c.new_tokens) // 16) for c in cases) + 16
    use_hf = "transformers" in engines
    llm = LLM(model, load_format="dummy" if use_hf else load_format, device=device, dtype=dtype,
              max_model_len=max_len, max_num_seqs=max_batch, max_num_batched_tokens=max(2048, max_batch),
              seed=seed, num_kv_pages=max(pages, -(-max_len // 16) + 1))
    eng = llm.engine
    dev, tdtype = eng.runner.device, eng.runner.dtype
    bandwidth = copy_bandwidth(dev)
    skipped_rows = [{**r, "engine": name} for r in skipped for name in engines]
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
    read_bytes = weight_bytes - untied_embedding_bytes(eng.runner.model)
    kv_per_token = eng.runner.layout.bytes_per_token
    path = resolve_model_path(model)
    torch.manual_seed(seed)
    hf = _hf_model(path, load_format, dev, tdtype) if use_hf else None
    if hf is not None:
        eng.runner.model.load_weights(hf.state_dict().items())     # identical weights in both engines
    vocab = eng.model_cfg.vocab_size
    rows = []
    for case in cases:
        prompts = _prompts(case, vocab, seed)
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for _ in range(repeats + 1):           # engines interleaved so machine noise hits both alike
            for name in engines:
                runs[name].append(run_tierserve(llm, case, prompts) if name == "tierserve"
                                  else run_transformers(hf, case, prompts))
        results = {}
        for name, rs in runs.items():          # the first run of each engine is its warm-up
            timed = sorted(rs[1:], key=lambda r: r["tok_s"])
            results[name] = {**timed[len(timed) // 2], "tok_s_runs": [round(r["tok_s"], 2) for r in rs[1:]]}
        ref = results.get("transformers", {}).get("tokens")
        fast = eng.runner.graphs is not None or eng.config.num_scheduler_steps > 1
        plain = plain_tokens(llm, case, prompts) if "tierserve" in results and fast else None
        for name, r in results.items():
            toks = r.pop("tokens")
            row = {"engine": name, "batch": case.batch, "context": case.context, "new_tokens": case.new_tokens,
                   "dtype": str(tdtype).replace("torch.", ""), **r,
                   "roofline_frac": roofline_frac(r["tok_s"], case.batch, case.context, case.new_tokens,
                                                  weight_bytes, kv_per_token, bandwidth),
                   "roofline_frac_bytes_read": roofline_frac(r["tok_s"], case.batch, case.context, case.new_tokens,
                                                             read_bytes, kv_per_token, bandwidth)}
            if ref is not None and name != "transformers":
                same = sum(a == b for a, b in zip(toks, ref))
                row["greedy_match_transformers"] = f"{same}/{len(ref)} sequences"
            if plain is not None and name == "tierserve":   # CUDA graphs + multi-step vs the plain path
                n = len(plain[0])
                row["tokens_equal_plain"] = all(a[:n] == b for a, b in zip(toks, plain))
                row["tokens_compared_plain"] = n
            rows.append(row)
            if progress:
                progress(row)
    rows += skipped_rows
    summary = {}
    for case in cases:
        pair = {r["engine"]: r for r in rows if r["batch"] == case.batch and r["context"] == case.context}
        if "tierserve" in pair and "transformers" in pair:
            summary[f"speedup_b{case.batch}_c{case.context}"] = pair["tierserve"]["tok_s"] / pair["transformers"]["tok_s"]
    summary["copy_bandwidth_GBps"] = bandwidth / 1e9
    summary["weight_bytes"] = weight_bytes
    summary["weight_bytes_read_per_step"] = read_bytes
    settings = dict(model=str(path), load_format=load_format, device=str(dev), dtype=str(tdtype),
                    cases=[c.__dict__ for c in cases], repeats=repeats, seed=seed,
                    threads=torch.get_num_threads())
    return make_result("tierserve bench", "decode", settings, rows, summary)
