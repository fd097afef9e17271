"""Engine: add requests, step, get outputs. Owns the scheduler, KV manager, runner and tokenizer."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from tierserve.config import EngineConfig
from tierserve.engine.output_builder import OutputBuilder, SampleGroup
from tierserve.engine.outputs import RequestOutput
from tierserve.engine.multi_step import MultiStepDecoder
from tierserve.engine.request import Request, Status
from tierserve.engine.scheduler import Scheduler
from tierserve.engine.stop import StopChecker
from tierserve.engine.tier_setup import make_tiers
from tierserve.kv.fp8_pages import Fp8PagePolicy
from tierserve.kv.manager import KVManager
from tierserve.loader.hf import load_config, load_generation_config, resolve_model_path
from tierserve.loader.tokenizer import IncrementalDetokenizer, Tokenizer
from tierserve.models.registry import model_config
from tierserve.runner.factory import make_runner
from tierserve.sampling import SamplingParams

log = logging.getLogger("tierserve")


class Engine(OutputBuilder):
    def __init__(self, config: EngineConfig, progress: bool = False) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        hf_cfg = load_config(self.model_path)
        self.model_cfg = model_config(hf_cfg)                 # unknown architecture -> ValueError early
        self.generation_config = load_generation_config(self.model_path)
        self.tokenizer = self._load_tokenizer(config)
        if config.max_model_len is None:
            config.max_model_len = self.model_cfg.max_position_embeddings
        self.max_model_len = config.max_model_len
        self.runner = make_runner(config, self.model_path, self.model_cfg, self.max_model_len, progress)
        self.runner.set_tokenizer(self.tokenizer)
        if config.enable_prefix_caching and not self.runner.supports_prefix_caching:
            log.info("prefix caching is off for %s: its per-request state is not paged yet",
                     self.model_cfg.architecture)
            config.enable_prefix_caching = False
        tiers = make_tiers(config, self.runner, self.model_path, self.max_model_len)
        if tiers is not None and not config.kv_load_overlap:
            tiers.overlap_loads = False
        host_pages = tiers.spill_capacity if tiers is not None else 0
        spill = None
        if host_pages:      # sparse attention counts its choices per page: placement follows them
            spill = self.runner.attach_spill(tiers, count_heat=self.runner.sparse is not None)
        compact = getattr(self.runner, "num_compact_pages", 0)          # FP8 pages in the compact pool
        cap = (self.runner.num_pages + compact + host_pages) * config.page_size   # live pages may spill to CPU RAM
        if cap < self.max_model_len or self.runner.num_pages < 2:
            raise ValueError(f"the KV pool holds {cap} tokens ({self.runner.num_pages} pages of "
                             f"{config.page_size}), fewer than max_model_len={self.max_model_len}; "
                             "lower max_model_len or give the pool more memory (num_kv_pages / gpu_kv_gb)")
        log.info("KV pool: %d pages%s = %d tokens of KV", self.runner.num_pages,
                 f" + {compact} FP8 compact pages" if compact else "", cap - host_pages * config.page_size)
        fp8 = Fp8PagePolicy(config.page_size, config.kv_fp8_keep_sink, config.kv_fp8_keep_recent) \
            if config.kv_dtype == "fp8" else None
        # a runner with per-request state (DeepSeek-V4) caches prefixes as state snapshots, not pages
        state_prefix = getattr(self.runner, "find_state_prefix", None) if config.enable_prefix_caching else None
        self.kv = KVManager(self.runner.num_pages, config.page_size,
                            config.enable_prefix_caching and state_prefix is None, tiers=tiers, fp8=fp8,
                            compact_slots=compact)
        if spill is not None and spill.page_heat is not None:
            self.kv.page_heat = spill.page_heat_of
            if spill.host_heat is not None:
                self.kv.slot_heat, self.kv.host_ram_slots = spill.slot_heat_of, spill.ram_slots
                self.kv.slot_top, self.kv.slot_clear = spill.top_slots, spill.clear_slots
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs, state_prefix)
        self.multi = MultiStepDecoder(self)          # num_scheduler_steps > 1: pipelined greedy windows
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._stop: dict[str, StopChecker] = {}
        self._groups: dict[str, SampleGroup] = {}
        self._parent: dict[str, str] = {}
        eos = self.generation_config.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = set(self.tokenizer.eos_token_ids or eos)
        self.num_generated_tokens = 0
        self.finished_outputs_only = False   # True: step() returns only finished requests (offline use)
        self.num_prompt_tokens = 0

    def _load_tokenizer(self, config: EngineConfig) -> Tokenizer:
        try:
            return Tokenizer.from_dir(resolve_model_path(config.tokenizer) if config.tokenizer
                                      else self.model_path)
        except FileNotFoundError:
            if config.load_format != "dummy" or config.tokenizer:
                raise
            log.warning("no tokenizer.json beside %s: using a synthetic tokenizer (token i <-> word 't<i>')",
                        self.model_path)
            return Tokenizer.synthetic(self.model_cfg.vocab_size)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None
                    ) -> None:
        params = params or SamplingParams()
        if request_id in self.requests or request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        if params.n == 1:
            self._add_one(request_id, text, ids, params)
            return
        children = [f"{request_id}#{i}" for i in range(params.n)]
        for i, cid in enumerate(children):
            p = params.clone()
            p.n = 1
            if p.seed is not None:
                p.seed += i
            self._add_one(cid, text, ids, p)
            self._parent[cid] = request_id
        self._groups[request_id] = SampleGroup(request_id, children)

    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids, text = list(prompt), None
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise ValueError("prompt token ids must be integers")
            bad = [t for t in ids if not 0 <= t < self.model_cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.model_cfg.vocab_size})")
        if not ids:
            raise ValueError("prompt must not be empty (it has 0 tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                             "(the prompt must leave room for at least one new token)")
        return text, ids

    def _add_one(self, rid: str, text: str | None, ids: list[int], params: SamplingParams) -> None:
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        req = Request(rid, ids, params, prompt=text, max_tokens=max_tokens, generator=gen)
        self.requests[rid] = req
        self._detok[rid] = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        self._stop[rid] = StopChecker(params, self.eos_token_ids)
        self.scheduler.add(req)
        self.num_prompt_tokens += len(ids)

    def abort_request(self, request_id: str) -> None:
        ids = self._groups[request_id].children if request_id in self._groups else [request_id]
        for rid in ids:
            req = self.requests.get(rid)
            if req is not None and not req.is_finished:
                req.finish_reason = "abort"
                self._finish(req)
            self._forget(rid)
        self._groups.pop(request_id, None)

    def demote_prefix_cache(self) -> int:
        """Move every cached, unused GPU page to the tier below now (benchmarks, memory pressure)."""
        n = self.kv.pool.clear_cache(demote=True)
        if self.kv.tiers is not None:
            self.runner.tiers_apply(self.kv.tiers.take_transfers())
        return n

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.multi.inflight is not None:          # a multi-step window is queued: read it
            return self._after_multi(self.multi.advance())
        # sparse + tiers: hot spilled pages back in (steps: those of the windows read since the last call)
        self.kv.rebalance(len(self.scheduler.running), self.multi.take_steps())
        so = self.scheduler.schedule()
        if so.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:     # nothing will free pages: no hang
                req = self.scheduler.waiting[0]
                raise RuntimeError(
                    f"request {req.request_id!r} cannot be scheduled: its next chunk does not fit in an idle KV "
                    f"pool ({self.kv.pool.num_free} free pages of {self.config.page_size} tokens"
                    f"{', CPU tier full' if self.kv.tiers is not None else ''}); raise --num-kv-pages / "
                    f"--gpu-kv-gb or --cpu-kv-gb, or lower --max-num-batched-tokens")
            return []
        k = self.multi.plan(so)
        if k > 1:
            return self._after_multi(self.multi.start(so, k))
        tiers = self.kv.tiers
        prefill = any(s.num_tokens > 1 for s in so.scheduled)
        if tiers is not None and prefill:          # prefill steps time the cost model's recompute side
            tiers.step_started(self.runner.device)
        result = self.runner.execute(so, tiers.take_transfers() if tiers is not None else None)
        if tiers is not None:
            # tokens x the context each attends to: the attention part of the cost
            attended = sum(s.num_tokens * s.start + s.num_tokens * (s.num_tokens + 1) // 2 for s in so.scheduled)
            tiers.step_done(so.num_batched_tokens if prefill else 0, attended)
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for s in so.scheduled:
            req = s.request
            if req.prompt_logprobs is not None and req.request_id in result.prompt_logprobs:
                req.prompt_logprobs.extend(result.prompt_logprobs[req.request_id])
            tok = result.sampled.get(req.request_id)
            self._accept(req, s.end, tok, result.logprobs.get(req.request_id), now)
            if tok is not None:
                self._emit(req, outputs)
        if self.kv.fp8 is not None:          # pages that left every full-precision window -> FP8
            self.runner.fp8.quantise(self.runner.kv.data, self.kv.take_quantise())
        if self.config.debug_invariants:
            self.kv.check_invariants()
            if self.kv.fp8 is not None:
                stored = set(self.runner.fp8.quantised.nonzero().flatten().tolist())
                assert self.kv.quantised <= stored, sorted(self.kv.quantised - stored)
            if tiers is not None:
                tiers.check_invariants()
        return outputs

    def _accept(self, req: Request, computed: int, tok: int | None, logprobs, now: float) -> None:
        """Record that ``computed`` tokens of ``req`` are in the KV cache and take its sampled token."""
        req.num_computed_tokens = computed
        self.kv.commit(req.request_id, req.all_token_ids, computed)
        if tok is None:
            return
        if req.first_token_time is None:
            req.first_token_time = now
        req.append_token(tok)
        self.num_generated_tokens += 1
        if req.logprobs is not None:
            req.logprobs.append(logprobs)
        self._check_stop(req, tok)

    def _after_multi(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        if self.kv.fp8 is not None:      # pages that left every full-precision window during the steps
            self.runner.fp8.quantise(self.runner.kv.data, self.kv.take_quantise())
        if self.config.debug_invariants:
            self.kv.check_invariants()
            if self.kv.fp8 is not None:
                assert self.kv.quantised <= set(self.runner.fp8.quantised.nonzero().flatten().tolist())
        return outputs

    def _check_stop(self, req: Request, tok: int) -> None:
        detok = self._detok[req.request_id]
        delta = detok.add(tok)
        reason = self._stop[req.request_id].check(req, tok, detok, delta, self.max_model_len)
        if reason is not None:
            detok.flush()
            self._finish(req)

    def _finish(self, req: Request) -> None:
        req.status = Status.FINISHED
        self.scheduler.finish(req)
        self.runner.release(req.request_id)          # per-request state the runner holds
