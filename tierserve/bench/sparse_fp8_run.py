"""Engine runs of `tierserve bench sparse-fp8` (see sparse_fp8.py): build an engine, prefill, time the decode and
one layer's attention call, and sections a and b."""
from __future__ import annotations

import gc
import itertools
import os
import time
from typing import TYPE_CHECKING

import torch

from tierserve.bench.decode import _sync
from tierserve.bench.sparse_fp8_timing import DecodeMetaCapture, attention_ms

if TYPE_CHECKING:
    from tierserve.bench.sparse_fp8 import Sizes

A_SETTINGS = {"bf16": {}, "fp8-weights+fp8-kv": {"quantization": "fp8", "kv_dtype": "fp8"},
              "fp8-weights": {"quantization": "fp8"}, "fp8-kv": {"kv_dtype": "fp8"},
              # opt-in: the output projection in FP8 too (nano ppl +0.124% against +0.130% for FP8 weights alone)
              "fp8-weights+fp8-kv+fp8-lm-head": {"quantization": "fp8", "kv_dtype": "fp8", "fp8_lm_head": True}}
B_SETTINGS = {"dense-bf16": {},
              "sparse+fp8-kv+fp8-weights": {"sparse_attention": "pages", "kv_dtype": "fp8", "quantization": "fp8"},
              "sparse": {"sparse_attention": "pages"},      # before sparse+fp8-kv: sparse alone vs dense first
              "sparse+fp8-kv": {"sparse_attention": "pages", "kv_dtype": "fp8"}, "fp8-kv": {"kv_dtype": "fp8"},
              # opt-in, lossy: the output projection in FP8 too (last: the first row a short budget skips)
              "sparse+fp8-kv+fp8-weights+fp8-lm-head": {"sparse_attention": "pages", "kv_dtype": "fp8",
                                                         "quantization": "fp8", "fp8_lm_head": True}}
DENSE_PREFILL = "dense prefill (sparse selection off until the first token), sparse decode"
SPARSE_PREFILL = "sparse prefill (own chunk dense, context top-k pages per 64-query block), sparse decode"


class Budget(Exception):
    """The section's time budget ran out (the message says where)."""


class Unmeasured(Exception):
    """The setting ran but left nothing to time (the message says why): a skipped row."""


def check(deadline: float, where: str) -> None:
    if time.perf_counter() > deadline:
        raise Budget(f"time budget ran out during {where}")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) \
            or getattr(torch._C, "_host_emptyCache", None)
        if host is not None:              # freed pinned blocks (a CPU tier) go back to the OS
            host()


class Bench:
    def __init__(self, model, sizes: Sizes, common: dict, seed: int, emit, log) -> None:
        self.model, self.sizes, self.common, self.seed, self.emit, self.log = model, sizes, common, seed, emit, log
        self._ids = itertools.count()
        self.bandwidth = None

    @property
    def page_size(self) -> int:
        """Tokens a KV page of this run's engines (``--page-size``, else the engine's default)."""
        from tierserve.config import DEFAULT_PAGE_SIZE
        return self.common.get("page_size") or DEFAULT_PAGE_SIZE

    def pool_pages(self, tokens: int) -> int:
        """KV pages for one sequence of ``tokens`` (+ 4 spare)."""
        return -(-tokens // self.page_size) + 4

    def build(self, **kw):
        from tierserve import LLM

        torch.manual_seed(self.seed)        # dummy weights on CUDA come from the global generator
        t = time.perf_counter()
        llm = LLM(self.model, **self.common, **kw)
        return llm, time.perf_counter() - t

    @staticmethod
    def prompt(n: int, vocab: int, seed: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

    def prefill(self, eng, prompt, new_tokens: int, deadline: float, dense: bool):
        """Add the request and step until its first token; returns (request, seconds)."""
        from tierserve import SamplingParams

        runner = eng.runner
        sparse = runner.sparse
        if dense:
            runner.sparse = None
        if runner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runner.device)
        t, rid = time.perf_counter(), f"r{next(self._ids)}"
        eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
        req = eng.requests[rid]
        try:
            while not req.output_token_ids:
                check(deadline, f"the prefill, at {req.num_computed_tokens} of {len(prompt)} tokens")
                eng.step()
        finally:
            runner.sparse = sparse
        _sync(runner.device)
        return req, time.perf_counter() - t

    def decode(self, eng, req, deadline: float, attention: bool = True, warmup_steps: int = 0) -> dict:
        """Step ``req`` (which has its first token) to the end: tok/s, attention ms per step, tokens. The first
        ``warmup_steps`` decode tokens are not timed (their wall time: ``decode_warmup_s``); counted in tokens, not
        engine steps, since a multi-step window makes several tokens in one step. A window the warm-up left queued
        (computed before the timer starts) is not timed either (``untimed_queued_tokens``; stop 22's section c rows
        with windows over the tiers counted it)."""
        runner, dev = eng.runner, eng.runner.device
        warm = {}
        # armed before the warm-up: with multi-step windows queued back to back the timed tokens may all come from
        # windows extended without a new ``_prepare`` (the request's first decode step prepares one)
        cap = DecodeMetaCapture(runner)
        cap.armed = True
        # windows count their steps when queued, so a warm-up may queue timed ones: counted from the warm-up on
        kinds0 = dict(getattr(runner, "step_kinds", {}))
        try:
            start = len(req.output_token_ids)
            if warmup_steps:
                t, goal = time.perf_counter(), start + warmup_steps
                while len(req.output_token_ids) < goal and not req.is_finished:
                    check(deadline, "the decode warm-up")
                    eng.step()
                if req.is_finished:
                    raise Unmeasured("decode warm-up: the request finished before its timed steps")
                _sync(dev)
                warm = {"decode_warmup_steps": warmup_steps, "decode_warmup_s": time.perf_counter() - t}
            # a multi-step window queued during the warm-up has run by now (the sync): its tokens are not timed
            multi = getattr(eng, "multi", None)
            queued = multi.inflight.steps if multi is not None and multi.inflight is not None else 0
            n0, t = len(req.output_token_ids), time.perf_counter()
            if warmup_steps:                 # a window makes several tokens at once: may exceed warmup_steps
                warm["decode_warmup_tokens"] = n0 - start
            while not req.is_finished:
                check(deadline, f"the decode, at {len(req.output_token_ids)} tokens")
                eng.step()
            _sync(dev)
            dt = time.perf_counter() - t
        finally:
            cap.close()
        n = len(req.output_token_ids) - n0 - queued
        if n <= 0:
            raise Unmeasured(f"decode: no timed token ({n0} made before the timer, {queued} in the window the warm-up "
                             f"queued, {len(req.output_token_ids)} in all): ask for more new tokens")
        if queued:
            warm["untimed_queued_tokens"] = queued
        out = {**warm, "tok_s": n / dt, "ms_per_token": 1e3 * dt / n, "timed_tokens": n,
               "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
               "tokens": list(req.output_token_ids),
               # decode steps by path, warm-up included: "plain" / "spill" CUDA graphs or "eager" (step_kinds)
               "step_kinds": {k: v - kinds0.get(k, 0) for k, v in getattr(runner, "step_kinds", {}).items()
                              if v != kinds0.get(k, 0)}}
        if attention and cap.meta is not None:   # the request is done; its pages still hold its KV
            per_layer, how = attention_ms(runner, cap.meta)
            out.update(attention_ms_per_layer=per_layer, attention_timing=how,
                       attention_ms_per_step=per_layer * eng.model_cfg.num_layers)
        return out

    def facts(self, eng, context: int, setting: dict) -> dict:
        """The decode path taken, and the roofline: bytes one decode step must read (weights + the KV tokens
        attention reads, FP8 KV counted as half) / measured copy bandwidth."""
        m = eng.runner.model
        wbytes = sum(t.numel() * t.element_size() for n, t in itertools.chain(m.named_parameters(), m.named_buffers())
                     if "rotary" not in n)
        read = min(context, self.sizes.topk + 80) if setting.get("sparse_attention") else context
        kv = read * eng.runner.layout.bytes_per_token * (0.5 if setting.get("kv_dtype") == "fp8" else 1.0)
        r = eng.runner
        out = {"cuda_graphs": r.graphs is not None, "backend": r.model.layers[0].self_attn.backend.name,
               "multi_step": eng.config.num_scheduler_steps if r.supports_multi_step() else 1,
               "weight_bytes": wbytes, "kv_read_bytes_per_step": int(kv)}
        if self.bandwidth:
            out["roofline_tok_s"] = self.bandwidth / (wbytes + kv)
        return out

    # ---- sections ----------------------------------------------------------------------------
    def run_settings(self, section: str, settings: list, deadline: float, one, base: dict | None = None) -> None:
        """``one(name, setting, deadline) -> row``: each setting in order, skipped past the budget."""
        last = 0.0
        for name, setting in settings:       # a list: a setting may append a follow-up while it runs
            head = {"section": section, "setting": name, "engine": "tierserve", **(base or {}),
                    **{k: setting[k] for k in ("context", "fallback_for") if k in setting}}
            left = deadline - time.perf_counter()
            if last > left:
                self.emit({**head, "skipped": f"time budget: {left:.0f} s left, the previous setting took {last:.0f} s"})
                continue
            t = time.perf_counter()
            try:
                self.emit({**head, **one(name, setting, deadline)})
            except (Budget, Unmeasured) as e:
                self.emit({**head, "skipped": str(e)})
            except ValueError as e:         # the engine refuses the combination (config validation)
                self.emit({**head, "skipped": f"engine refused the setting: {e}"})
            except Exception as e:          # report and go on: one failing setting must not lose the others
                self.emit({**head, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            free_memory()
            last = time.perf_counter() - t

    def section_a(self, deadline: float) -> None:
        s = self.sizes
        ctx, new = s.short_context, s.short_new_tokens
        kw = dict(max_model_len=ctx + new + 16, num_kv_pages=self.pool_pages(ctx + new + 16),
                  max_num_batched_tokens=max(2048, ctx))
        ref: dict = {}

        def one(name, setting, deadline):
            llm, build_s = self.build(**kw, **setting)
            eng = llm.engine
            prompt = self.prompt(ctx, eng.model_cfg.vocab_size, self.seed)
            runs = []
            for _ in range(s.repeats + s.warmup):       # the first run is the warm-up (compiles, captures)
                req, ttft = self.prefill(eng, prompt, new, deadline, dense=False)
                runs.append({**self.decode(eng, req, deadline), "ttft_s": ttft})
            runs = runs[int(s.warmup):]
            mid = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
            toks = mid.pop("tokens")
            row = {"context": ctx, "batch": 1, "new_tokens": new, **setting, **mid, "build_s": build_s,
                   "tok_s_runs": [round(r["tok_s"], 2) for r in runs], **self.facts(eng, ctx, setting)}
            if name == "bf16":
                ref.update(tokens=toks, tok_s=row["tok_s"])
            elif ref:
                same = sum(a == b for a, b in zip(toks, ref["tokens"]))
                diff = next((i for i, (a, b) in enumerate(zip(toks, ref["tokens"])) if a != b), None)
                row.update(speedup_vs_bf16=row["tok_s"] / ref["tok_s"], greedy_match_bf16=same / len(toks),
                           greedy_first_diff=diff)
            del llm
            return row
        self.run_settings("a", list(A_SETTINGS.items()), deadline, one, {"context": ctx})

    def long_run(self, llm, ctx: int, new: int, deadline: float, dense_prefill: bool, warmup_steps: int = 0) -> dict:
        """Warm up on other tokens (kernels for fresh and continued chunks, decode), then prefill ``ctx`` once
        and decode ``new`` tokens."""
        eng = llm.engine
        vocab = eng.model_cfg.vocab_size
        if self.sizes.warmup:
            warm = self.prompt(min(ctx, 2 * eng.config.max_num_batched_tokens + 17), vocab, self.seed + 1)
            req, _ = self.prefill(eng, warm, 4, deadline, dense_prefill)
            self.decode(eng, req, deadline, attention=False)
        req, ttft = self.prefill(eng, self.prompt(ctx, vocab, self.seed), new + warmup_steps, deadline,
                                 dense_prefill)
        out = self.decode(eng, req, deadline, warmup_steps=warmup_steps)
        out.pop("tokens")
        return {"prefill_s": ttft, "prefill_tok_s": ctx / ttft, **out}

    def section_b(self, deadline: float) -> None:
        s = self.sizes
        ctx, new = s.long_context, s.long_new_tokens
        pages = self.pool_pages(ctx + new + 16)
        ref: dict = {}

        def one(name, setting, deadline):
            setting = dict(setting, **({"sparse_topk_tokens": s.topk} if "sparse_attention" in setting else {}))
            why = self.gpu_room(pages, sparse="sparse_attention" in setting)
            if why:
                return {"skipped": why}
            llm, build_s = self.build(max_model_len=ctx + new + 16, num_kv_pages=pages,
                                      max_num_batched_tokens=min(s.chunk, ctx), **setting)
            sparse = "sparse_attention" in setting
            # sparse prefill over FP8 pages runs through flash since stop 24 (attention/sparse_fp8_prefill.py);
            # TIERSERVE_BENCH_DENSE_FP8_FILL=1 keeps the earlier stops' dense fill of those rows, for comparison
            dense_fill = sparse and "kv_dtype" in setting and os.environ.get("TIERSERVE_BENCH_DENSE_FP8_FILL") == "1"
            row = {"context": ctx, "batch": 1, "new_tokens": new, **setting, "build_s": build_s,
                   "kv_fill": DENSE_PREFILL if dense_fill else SPARSE_PREFILL if sparse else "prefill",
                   **self.long_run(llm, ctx, new, deadline, dense_prefill=dense_fill),
                   **self.facts(llm.engine, ctx, setting)}
            if name == "dense-bf16":
                ref.update(row)
            elif ref:
                row["speedup_vs_dense_bf16"] = row["tok_s"] / ref["tok_s"]
                if "attention_ms_per_step" in row and "attention_ms_per_step" in ref:
                    row["attention_speedup_vs_dense_bf16"] = ref["attention_ms_per_step"] / row["attention_ms_per_step"]
            del llm
            return row
        self.run_settings("b", list(B_SETTINGS.items()), deadline, one, {"context": ctx})

    def gpu_room(self, pages: int, sparse: bool, extra_gib: float = 6.0) -> str | None:
        """A reason the weights + a pool of ``pages`` cannot fit on this GPU, or None."""
        from tierserve.loader.hf import load_config, resolve_model_path
        from tierserve.models.config import ModelConfig

        if not (torch.cuda.is_available() and self.common.get("device") in ("auto", "cuda")):
            return None
        cfg = ModelConfig.from_hf(load_config(resolve_model_path(self.model)))
        page = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * (self.page_size + (1 if sparse else 0))
        need = 2 * cfg.num_params() + pages * page + extra_gib * 2**30
        free = torch.cuda.mem_get_info()[0]
        if need > free:
            return (f"needs {need / 2**30:.1f} GiB of GPU memory (bf16 weights, {pages} KV pages of "
                    f"{page / 2**20:.2f} MiB, {extra_gib:.0f} GiB work), {free / 2**30:.1f} GiB free")
        return None
