"""`tierserve bench deepseek-v4`: a V4-Flash-shaped model cut to its first N layers, dummy weights, tierserve
against transformers' ``DeepseekV4ForCausalLM`` on the same weights in the same run (issue 7).

Per context (batch 1, greedy): TTFT, decode tok/s (``cuda_graphs``: whether tierserve's decode steps ran as
CUDA graphs, ``graph_replays``: how many), peak GPU memory, tierserve's state bytes per token
(runner and ``kv_bytes.py``) against a Llama-3.1-8B's 131072. tierserve runs first (dummy weights built on
the device, prefill in chunks of ``max_num_batched_tokens``, stopped past its time budget); then
transformers' model is built on the device and filled from ours (2 x 55 GB resident only for that copy),
ours is freed, transformers runs. Out of memory is a row; larger contexts are then skipped with the reason.
"""
from __future__ import annotations

import gc
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from tierserve.bench.decode import DecodeCase, _sync, copy_bandwidth, run_transformers
from tierserve.bench.results import make_result, row_emitter

LLAMA_31_8B_KV_BYTES = 131072          # 32 layers x 2 (K, V) x 8 heads x 128 x 2 bytes (bf16)
CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
# --smoke: the shipped config's layer pattern at test-model sizes (HCA ratio 8 so short prompts have entries)
SMOKE = dict(vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
             q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=4, o_groups=2, o_lora_rank=16,
             index_n_heads=16, index_head_dim=16, index_topk=3, sliding_window=8, hc_mult=2,
             compress_rates={CSA: 4, HCA: 8}, qk_rope_head_dim=8, partial_rotary_factor=0.25,
             rope_parameters={k: dict(rope_type="default", rope_theta=t, partial_rotary_factor=0.25)
                              for k, t in (("main", 1e4), ("compress", 1.6e5))})

# transformers' module names -> ours (weights.py maps checkpoint keys; this maps transformers' in-memory names)
_HF_RENAMES = [(re.compile(p), r) for p, r in (x.split(" ") for x in (
    r"^model\.embed_tokens\. embed.", r"^lm_head\. head.", r"^model\.norm\. norm.", r"^model\.hc_head\.hc_ hc_head.",
    r"^model\. ", r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\. .attn.indexer.weights_proj.",
    r"\.self_attn\.compressor\.indexer\.q_b_proj\. .attn.indexer.wq_b.",
    r"\.self_attn\.compressor\.indexer\. .attn.indexer.compressor.", r"\.self_attn\. .attn.",
    r"\.shared_experts\.gate_proj\. .shared_experts.w1.", r"\.shared_experts\.up_proj\. .shared_experts.w3.",
    r"\.shared_experts\.down_proj\. .shared_experts.w2.", r"\.gate\.e_score_correction_bias$ .gate.bias",
    r"\.mlp\. .ffn.", r"\.sinks$ .attn_sink", r"\.position_bias$ .ape", r"\.q_a_proj\. .wq_a.", r"\.q_b_proj\. .wq_b.",
    r"\.q_a_norm\. .q_norm.", r"\.kv_proj\. .wkv.", r"\.gate_proj\. .wgate.", r"\.kv_norm\. .norm.",
    r"\.o_a_proj\. .wo_a.", r"\.o_b_proj\. .wo_b.", r"\.input_layernorm\. .attn_norm.",
    r"\.post_attention_layernorm\. .ffn_norm.", r"\.attn_hc\. .hc_attn.", r"\.ffn_hc\. .hc_ffn."))]


def bench_config(model: str | None, layers: int | None, smoke: bool) -> dict:
    """config.json cut to the first ``layers`` layers (None: all), types kept; ``smoke``: test-model sizes."""
    from tierserve.loader.hf import resolve_model_path

    cfg = json.loads((resolve_model_path(model or "deepseek-v4-flash") / "config.json").read_text())
    layers = cfg["num_hidden_layers"] if layers is None else layers
    if not 1 <= layers <= cfg["num_hidden_layers"]:
        raise ValueError(f"--layers must be in [1, {cfg['num_hidden_layers']}], got {layers}")
    cfg.update(num_hidden_layers=layers, layer_types=cfg["layer_types"][:layers],
               mlp_layer_types=cfg["mlp_layer_types"][:layers], num_nextn_predict_layers=0)
    return {**cfg, **SMOKE} if smoke else cfg


def hf_to_ours(name: str) -> str:
    for pat, repl in _HF_RENAMES:
        name = pat.sub(repl, name)
    return name


@torch.no_grad()
def copy_into_hf(ours, hf) -> int:
    """Fill every tensor of transformers' model from ours (experts stacked: gate_up = [w1; w3], down = w2);
    raises if a tensor on either side has no counterpart. Returns the number of tensors copied."""
    src = dict(ours.named_parameters()) | dict(ours.named_buffers())
    used, n = set(), 0
    for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
        if "rotary_emb" in name:                  # rope tables, computed from the config by both
            continue
        mine = hf_to_ours(name)
        if mine.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            base, inter, down = mine.rsplit(".", 1)[0], t.shape[1] // 2, mine.endswith("down_proj")
            for e in range(t.shape[0]):
                parts = ([(t[e], "w2")] if down else [(t[e, :inter], "w1"), (t[e, inter:], "w3")])
                for dst, w in parts:
                    dst.copy_(src[f"{base}.{e}.{w}.weight"])
                    used.add(f"{base}.{e}.{w}.weight")
        elif mine in src and src[mine].shape == t.shape:
            t.copy_(src[mine])
            used.add(mine)
        else:
            raise ValueError(f"transformers tensor {name} ({tuple(t.shape)}): no tensor {mine!r} of that shape in ours")
        n += 1
    if set(src) - used:
        raise ValueError(f"not copied into transformers' model: {sorted(set(src) - used)[:8]}")
    return n


def decode_read_bytes(model, state_bytes: float) -> float:
    """Bytes a batch-1 decode step reads: all weights but the embeddings and unselected experts, the state."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".ffn.experts." not in n and n != "embed.weight")
    for b in model.layers:
        total += b.ffn.gate.topk * sum(w.weight.nbytes for w in (b.ffn.experts[0].w1, b.ffn.experts[0].w2,
                                                                 b.ffn.experts[0].w3))
    return total + state_bytes


def _run_ours(eng, context: int, prompt: list[int], new: int, deadline: float) -> dict:
    """One request through the engine (aborted past ``deadline``): TTFT, tok/s, peak memory, state bytes."""
    from tierserve import SamplingParams

    dev = eng.runner.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    eng.add_request("v4", prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    t_first, tokens, state = None, None, 0
    while eng.has_unfinished_requests():
        if time.perf_counter() > deadline:
            where = "in decode" if t_first else f"prefill at {eng.requests['v4'].num_computed_tokens}/{context} tokens"
            eng.abort_request("v4")
            return {"skipped": f"time budget: stopped after {time.perf_counter() - t0:.1f} s, {where}"}
        outs = eng.step()
        for o in outs:
            if o.finished:
                tokens = o.outputs[0].token_ids
        if t_first is None and (tokens is not None or eng.requests["v4"].output_token_ids):
            _sync(dev)
            t_first = time.perf_counter()
            state = eng.runner.state_bytes()
    _sync(dev)
    dec = time.perf_counter() - t_first
    return {"tok_s": (new - 1) / dec if dec > 0 else float("nan"), "ms_per_token": 1e3 * dec / max(new - 1, 1),
            "ttft_s": t_first - t0, "prefill_tok_s": context / (t_first - t0),
            "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "state_bytes": state, "state_bytes_per_token": state / context, "tokens": tokens}


def _free(model) -> None:
    """Drop the storage of every tensor of ``model`` now, whoever still holds the module (the engine)."""
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.new_empty(0)
    for m in model.modules():             # the MoE's stacked experts (moe.py: MoE.stacked)
        if getattr(m, "_stacked", None) is not None:
            m._stacked = None


def _replays(runner) -> int:
    """Decode steps the runner has run through CUDA graphs so far."""
    slots = getattr(runner, "slots", None)
    return slots.replays if slots is not None else 0


def _guarded(fn, dev: torch.device) -> dict:
    """``fn()``'s row; out of memory or another error becomes the row (first line of the message)."""
    try:
        r = fn()
    except RuntimeError as e:         # torch.OutOfMemoryError is one
        line = (str(e).strip().splitlines() or [""])[0]
        oom = isinstance(e, torch.OutOfMemoryError)
        r = {"out_of_memory": line} if oom else {"error": f"{type(e).__name__}: {line}"}
    _collect(dev)                     # outside the handler: the traceback's frames hold the big tensors
    return r


def _collect(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def bench_deepseek_v4(model: str | None, contexts: list[int], *, layers: int = 4, new_tokens: int = 32,
                      long_new_tokens: int = 32, chunk: int = 8192, device: str = "auto", dtype: str = "auto",
                      seed: int = 0, ours_budget_s: float = 330.0, max_wall_s: float = 500.0,
                      engines=("tierserve", "transformers"), smoke: bool = False, partial_path=None,
                      progress=None, log=print, cpu_experts: bool = False) -> dict:
    from tierserve import LLM
    from tierserve.models.deepseek_v4.config import DeepseekV4Config
    from tierserve.models.deepseek_v4.kv_bytes import state_bytes

    t_start = time.perf_counter()
    cfg = bench_config(model, layers, smoke)
    folder = Path(tempfile.mkdtemp(prefix="v4-bench-"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    contexts = sorted(contexts)
    new_for = {c: (long_new_tokens if c > 65536 else new_tokens) for c in contexts}
    settings = dict(model=model or "deepseek-v4-flash", layers=layers, layer_types=cfg["layer_types"],
                    mlp_layer_types=cfg["mlp_layer_types"], contexts=contexts, new_tokens=new_for, chunk=chunk,
                    seed=seed, smoke=smoke, ours_budget_s=ours_budget_s, max_wall_s=max_wall_s, engines=list(engines),
                    cpu_experts=cpu_experts)
    rows: list[dict] = []
    emit = row_emitter(rows, settings, partial_path, progress)
    prompts = {c: torch.randint(3, cfg["vocab_size"], (c,), generator=torch.Generator().manual_seed(seed + c)).tolist()
               for c in contexts}
    max_len = contexts[-1] + max(new_for.values()) + 8
    # the state pool sized for the one sequence (not what gpu_memory_utilization leaves: prefill activations
    # and, later, transformers' model need that memory)
    llm = LLM(str(folder), load_format="dummy", device=device, dtype=dtype, seed=seed, max_num_seqs=1,
              max_model_len=max_len, max_num_batched_tokens=chunk, enable_prefix_caching=False,
              num_kv_pages=-(-max_len // 16) + 1, page_size=16)
    eng, ours = llm.engine, llm.engine.runner.model
    dev, tdtype = eng.runner.device, eng.runner.dtype
    n_params, weight_bytes = sum(p.numel() for p in ours.parameters()), sum(p.nbytes for p in ours.parameters())
    sb, es = state_bytes(ours.config), torch.empty(0, dtype=tdtype).element_size()     # bf16 layout; es: run's
    sb_run = state_bytes(ours.config, buffer_dtype_bytes=es)
    sb_full = state_bytes(DeepseekV4Config.from_hf(bench_config(model, None, smoke))).per_token
    bandwidth = copy_bandwidth(dev)
    log(f"built {n_params / 1e9:.2f}B parameters ({weight_bytes / 2**30:.1f} GiB, {tdtype}) on {dev} "
        f"in {time.perf_counter() - t_start:.1f} s; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    common, warm = dict(dtype=str(tdtype).replace("torch.", ""), batch=1), prompts[contexts[0]][:64]
    ours_tokens, done, graph_ms = {}, {}, None
    if "tierserve" in engines:
        _run_ours(eng, len(warm), warm, 4, float("inf"))            # warm-up (kernels, allocator)
        for c in contexts:
            replays = _replays(eng.runner)
            r = _guarded(lambda: _run_ours(eng, c, prompts[c], new_for[c], t_start + ours_budget_s), dev)
            r.update(cuda_graphs=bool(getattr(eng.runner, "cuda_graphs", False)),
                     graph_replays=_replays(eng.runner) - replays)
            eng.abort_request("v4")           # a no-op unless the run stopped with an error
            ours_tokens[c] = r.pop("tokens", None)
            if "tok_s" in r:
                read = decode_read_bytes(ours, r["state_bytes"])
                r.update(model_state_bytes_per_token=sb_run.per_token * es / 2,
                         state_bytes_at_context=(sb_run.window + sb_run.per_token * c) * es / 2 + sb_run.buffers,
                         llama_kv_ratio=LLAMA_31_8B_KV_BYTES / r["state_bytes_per_token"],
                         decode_read_bytes_per_step=read, bandwidth_bound_tok_s=bandwidth / read,
                         roofline_frac=r["tok_s"] * read / bandwidth)
            emit(done.setdefault(("tierserve", c), {"engine": "tierserve", "context": c, "new_tokens": new_for[c],
                                                     **common, **r}))
        if getattr(eng.runner, "slots", None) is not None:
            graph_ms = eng.runner.slots.time_replay(1)     # the batch-1 decode graph alone (free slots)
    hf, stop = None, None
    if "transformers" in engines and time.perf_counter() - t_start <= max_wall_s:
        try:
            if getattr(eng.runner, "slots", None) is not None:    # slot buffers and graphs go first
                eng.runner.slots = None
            hf = _hf_from_ours(folder, ours, dev, tdtype, log)
            run_transformers(hf, DecodeCase(1, len(warm), 2), [warm])                   # warm-up
        except (RuntimeError, ValueError) as e:
            hf, stop = None, f"transformers' model could not be built or run: {type(e).__name__}: {str(e)[:300]}"
        _collect(dev)
    for c in contexts if "transformers" in engines else []:
        if stop:
            r = {"skipped": stop}
        elif hf is None or time.perf_counter() - t_start > max_wall_s:
            r = {"skipped": f"time budget: {max_wall_s:.0f} s of the run used"}
        else:
            r = _guarded(lambda: run_transformers(hf, DecodeCase(1, c, new_for[c]), [prompts[c]]), dev)
        if "tok_s" in r:
            r.pop("engine", None)
            toks, mine = r.pop("tokens")[0], ours_tokens.get(c)
            if mine is not None:
                same = next((i for i, (a, b) in enumerate(zip(mine, toks)) if a != b), min(len(mine), len(toks)))
                r.update(greedy_match_tierserve=f"{same}/{len(toks)} leading tokens", greedy_equal=mine == toks)
        elif "skipped" not in r:
            stop = f"{'ran out of memory' if 'out_of_memory' in r else 'failed'} at context {c} already"
        emit(done.setdefault(("transformers", c), {"engine": "transformers", "context": c,
                                                    "new_tokens": new_for[c], **common, **r}))
    hf = None
    _collect(dev)
    if cpu_experts:                   # the same model with its routed experts in CPU RAM, at the first context
        from tierserve.bench.deepseek_v4_cpu_experts import run_cpu_experts

        _free(ours)
        c = contexts[0]
        r = run_cpu_experts(folder, c, prompts[c], new_for[c], chunk=chunk, device=device, dtype=dtype, seed=seed,
                            max_len=max_len, budget_s=max(60.0, max_wall_s - (time.perf_counter() - t_start)),
                            run=_run_ours, free=_free, collect=_collect)
        emit(done.setdefault(("tierserve-cpu-experts", c), {"engine": "tierserve-cpu-experts", "context": c,
                                                             "new_tokens": new_for[c], **common, **r}))
    settings.update(device=str(dev), dtype=str(tdtype))
    summary = _summary(done, contexts, sb.per_token, sb_full)
    summary.update(graph_replay_ms_batch1=graph_ms,      # the decode step's graph alone, no engine around it
                   params=n_params, weight_bytes=weight_bytes, copy_bandwidth_GBps=bandwidth / 1e9,
                   wall_s=time.perf_counter() - t_start)
    return make_result("tierserve bench", "deepseek-v4", settings, rows, summary)


def _hf_from_ours(folder: Path, ours, dev: torch.device, dtype: torch.dtype, log):
    """transformers' model on the device from the same config.json, filled from ours; then ours is freed."""
    import transformers

    t0 = time.perf_counter()
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder),
                                                           dtype=dtype).eval()
    copied = copy_into_hf(ours, hf)
    _free(ours)
    _collect(dev)
    log(f"transformers model built and filled from ours ({copied} tensors) in {time.perf_counter() - t0:.1f} s; ours "
        f"freed, {torch.cuda.memory_allocated(dev) / 2**30 if dev.type == 'cuda' else 0:.1f} GiB allocated on the GPU")
    return hf


def _summary(done: dict, contexts: list[int], per_token: float, per_token_full: float) -> dict:
    ours, hf = ({c: done.get((e, c), {}) for c in contexts} for e in ("tierserve", "transformers"))
    short, long_ = contexts[0], contexts[-1]
    out = {"tierserve_cuda_graphs": any(ours[c].get("cuda_graphs") for c in contexts),
           "state_bytes_per_token_bf16_this_model": per_token, "state_bytes_per_token_bf16_full_config":
           per_token_full, "llama_3_1_8b_kv_bytes_per_token": LLAMA_31_8B_KV_BYTES,
           "llama_ratio_full_config": LLAMA_31_8B_KV_BYTES / per_token_full}
    for c in contexts:
        if "tok_s" in ours[c] and "tok_s" in hf[c]:
            out[f"speedup_c{c}"] = ours[c]["tok_s"] / hf[c]["tok_s"]
            out[f"ttft_speedup_c{c}"] = hf[c]["ttft_s"] / ours[c]["ttft_s"]
    if "tok_s" in ours[short] and "tok_s" in ours[long_]:
        out[f"decode_c{long_}_vs_c{short}"] = ours[long_]["tok_s"] / ours[short]["tok_s"]
    cpu = done.get(("tierserve-cpu-experts", short), {})
    if "tok_s" in cpu and "tok_s" in ours[short]:
        out[f"cpu_experts_tok_s_c{short}"] = cpu["tok_s"]
        out[f"cpu_experts_over_device_c{short}"] = cpu["tok_s"] / ours[short]["tok_s"]
        if cpu.get("peak_gpu_gib") and ours[short].get("peak_gpu_gib"):
            out[f"cpu_experts_peak_gpu_gib_saved_c{short}"] = ours[short]["peak_gpu_gib"] - cpu["peak_gpu_gib"]
    out["targets"] = {f"speedup_ge_5x_at_c{short}": out.get(f"speedup_c{short}", 0) >= 5,
                      "tierserve_runs_every_context": all("tok_s" in ours[c] for c in contexts),
                      f"decode_c{long_}_ge_half_of_c{short}": out.get(f"decode_c{long_}_vs_c{short}", 0) >= 0.5}
    return out


def result_from_partial(partial, device: str | None = None) -> dict:
    """The result of a stopped ``bench deepseek-v4`` run, rebuilt from its partial file (the summary's
    state bytes recomputed from the settings' config; the batch-1 graph replay time is not in the rows)."""
    from tierserve.bench.results import result_from_partial as rebuild
    from tierserve.models.deepseek_v4.config import DeepseekV4Config
    from tierserve.models.deepseek_v4.kv_bytes import state_bytes

    def summarize(settings: dict, rows: list[dict]) -> dict:
        per_token = state_bytes(DeepseekV4Config.from_hf(bench_config(settings["model"], settings["layers"],
                                                                      settings["smoke"]))).per_token
        full = state_bytes(DeepseekV4Config.from_hf(bench_config(settings["model"], None,
                                                                 settings["smoke"]))).per_token
        done = {(r["engine"], r["context"]): r for r in rows}
        return _summary(done, sorted(settings["contexts"]), per_token, full)
    return rebuild(partial, "deepseek-v4", summarize, device)
