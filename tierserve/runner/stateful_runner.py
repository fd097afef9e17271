"""StatefulRunner: the engine's runner for models that keep an explicit per-request state.

DeepSeek-V4 (``tierserve.models.deepseek_v4``) does not fit the paged K/V layout of ``ModelRunner``:
its attention reads a sliding window, pooled (compressed) entries and indexer keys, all held in an
immutable ``SequenceState`` per request. This runner keeps one such state per running request in a
dict:

* the one-token chunks of a step that continue a stored state (decode steps) run together: on CUDA in
  fixed slot buffers as one CUDA graph per batch bucket (``stateful_graphs.py``; ``enforce_eager`` runs
  that code eagerly, as ``enable_slot_decode(False)`` does), else in one ``model.decode_batch`` pass
  (packed per-token work, the MoE over all rows' tokens, attention over padded stacks of the rows'
  states; ``batch_decode = False`` or TIERSERVE_STATEFUL_BATCH_DECODE=0 runs them one request per
  forward as below);
* a chunk starting at position 0 runs ``model.prefill``; a later chunk (chunked prefill) or a decode
  step runs ``model.forward_step(new_ids, state)`` on the stored state, and the returned state
  replaces it;
* the states of preempted requests (``SchedulerOutput.preempted``) are dropped at the start of a
  step, those of finished or aborted requests through ``release`` (called by the engine);
* the last row of each request that samples goes through the shared ``Sampler`` exactly as in
  ``ModelRunner`` (greedy fast path, penalties, top-k/p, seeds, logprobs); prompt logprobs come from
  the chunk's own logits.

Pages: the engine's ``KVManager`` hands out page ids as for paged K/V, and its pool size is the real
state budget (``stateful_setup.pool_pages``: ``num_kv_pages``, ``gpu_kv_gb`` or what
``gpu_memory_utilization`` leaves, less a fixed "state page" per ``max_num_seqs`` request). The slot
decoder keeps every layer's compressed entries and indexer keys in page pools of that many pages,
addressed by the requests' page tables (``models/deepseek_v4/paged_state.py``), so the scheduler's page
budget and preemption bound that memory. Requests outside the slots (prefill, longer chunks, the eager
``decode_batch`` path) still hold private ``SequenceState`` tensors; their pages are reserved but not
filled until they join a slot. Lower KV tiers are refused here. ``kv_dtype="fp8"`` stores each layer's compressed entries and
indexer keys in DeepSeek's MODEL1 layout (``models/deepseek_v4/model1.py``; window rings and open
compressor windows stay in the model dtype). See docs/deepseek_v4.md.

Prefix caching keeps whole state snapshots at prefix-unit boundaries (``state_cache.py``): chunks are
split at every boundary they cross and the state there is stored; the scheduler asks
``find_state_prefix`` for a waiting request (instead of the KV manager's page index), which puts the
snapshot in place as the request's state and returns how many tokens it covers. The scheduler then
starts the request there; its page table still covers all of its tokens (fresh pages, which the snapshot's
entries are copied into when it joins a decode slot).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from tierserve.config import EngineConfig
from tierserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from tierserve.runner.model_runner import StepOutput, resolve_device, resolve_dtype
from tierserve.runner.sampler import Sampler, prompt_logprob_rows, sample_requests
from tierserve.runner.stateful_graphs import InSlot
from tierserve.runner.stateful_setup import (LOADERS, BookkeepingFp8, NoPagedKV, check_config, make_prefix_cache,
                                             make_slot_decoder, pool_pages, prompt_logprob_range as _prompt_logprob_range,
                                             setup_slots_refusal)

log = logging.getLogger("tierserve")

class StatefulRunner:
    """Same interface as ``ModelRunner`` as far as the engine uses it."""

    supports_prefix_caching = True      # through find_state_prefix (state snapshots), not the page index

    def __init__(self, config: EngineConfig, model_path: Path, model_cfg, max_model_len: int,
                 progress: bool = False) -> None:
        arch = model_cfg.architecture
        check_config(config, arch)
        if arch not in LOADERS:
            raise ValueError(f"no stateful runner support for {arch!r}; supported: {', '.join(sorted(LOADERS))}")
        self.config = config
        self.model_cfg = model_cfg
        self.max_model_len = max_model_len
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, model_cfg, self.device)
        self.model = LOADERS[arch](model_path, model_cfg, config, self.dtype, self.device)
        # kv_dtype fp8: compressed entries and indexer keys in the MODEL1 layout (docs/deepseek_v4.md)
        self.model.set_kv_dtype(config.kv_dtype)
        # the page budget: the real state memory (entries + keys per page, fixed state per request)
        self.num_pages, self.page_bytes, self.fixed_state_bytes = pool_pages(
            self.model, config, max_model_len, self.device)
        log.info("%s state pool: %d pages of %d tokens (%d B each), %.2f MiB fixed state per request",
                 model_cfg.architecture, self.num_pages, config.page_size, self.page_bytes,
                 self.fixed_state_bytes / 2**20)
        # what ModelRunner has for paged K/V; nothing of it exists here
        # (with kv_dtype fp8 the engine hands ``kv.data`` to ``fp8.quantise``: an empty stand-in)
        self.kv = NoPagedKV() if config.kv_dtype == "fp8" else None
        self.layout = None
        self.host_kv = None
        # kv_dtype fp8: the engine's page policy still queues pages "for quantisation"; the entries in them
        # are stored in MODEL1 already, so this only records them
        self.fp8 = BookkeepingFp8(self.num_pages) if config.kv_dtype == "fp8" else None
        self.sparse = None
        self.graphs = None
        self.engram_hasher = None
        self.tokenizer = None
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.states: dict[str, Any] = {}     # request id -> the state after its computed tokens
        # decode rows of a step in one forward (``decode_batch``); off: one forward per request (the old
        # path, kept as the reference); TIERSERVE_STATEFUL_BATCH_DECODE=0 turns it off at start
        self.batch_decode = os.environ.get("TIERSERVE_STATEFUL_BATCH_DECODE", "1").strip().lower() not in (
            "0", "false", "no", "off")
        # decode rows in fixed slot buffers, one CUDA graph per batch bucket (runner/stateful_graphs.py) on
        # CUDA; enforce_eager runs the same slot code without graphs, so both give the same bits
        self.slots = None
        if self.device.type == "cuda" and self.batch_decode:
            self.enable_slot_decode(use_graphs=not config.enforce_eager)
        # after the slot decoder: its pool is allocated, so the free memory the budget looks at is what is left
        self.prefix_cache = make_prefix_cache(self.model_cfg, config, self.dtype, self.num_pages, self.device) \
            if config.enable_prefix_caching else None

    def enable_slot_decode(self, use_graphs: bool) -> bool:
        """Decode through ``SlotDecoder`` (``stateful_graphs.py``); False (logged) where it cannot."""
        self.slots = None
        reason = setup_slots_refusal(self.model, self.config)
        if reason is None:
            try:
                self.slots = make_slot_decoder(self.model, self.config, self.max_model_len, self.device, use_graphs,
                                               self.num_pages)
            except Exception as e:      # noqa: BLE001 - capture / kernel compile failed, out of memory: run eager
                reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            log.warning("%s decode runs without slot buffers / CUDA graphs: %s", self.model_cfg.architecture, reason)
        return self.slots is not None

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps run as CUDA graphs."""
        return self.slots is not None and self.slots.uses_graphs

    # ---- engine hooks ---------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def supports_multi_step(self) -> bool:
        return False

    def execute_multi(self, so: SchedulerOutput, steps: int) -> list[list[int]]:
        raise NotImplementedError("StatefulRunner runs one step per engine step (supports_multi_step is False)")

    def tiers_apply(self, transfers) -> None:
        if transfers:
            raise RuntimeError("StatefulRunner has no paged K/V to move between tiers")

    def _drop(self, rid: str) -> None:
        if self.slots is not None and rid in self.slots.slot_of:
            self.slots.evict(rid, export=False)
        self.states.pop(rid, None)

    def _take_state(self, rid: str):
        """The request's ``SequenceState`` (taken out of its slot if it is in one), or None."""
        st = self.states.get(rid)
        if isinstance(st, InSlot):
            st = self.states[rid] = self.slots.evict(rid)
        return st

    def release(self, request_id: str) -> None:
        """Drop the state of a finished or aborted request."""
        self._drop(request_id)
        if self.prefix_cache is not None:
            self.prefix_cache.forget(request_id)

    def find_state_prefix(self, request_id: str, token_ids, max_tokens: int) -> int:
        """Scheduler hook for a waiting request: tokens of its longest stored prefix (at most
        ``max_tokens``); that snapshot becomes its state, so its first chunk continues from there."""
        if self.prefix_cache is None:
            return 0
        n, state = self.prefix_cache.lookup(token_ids, max_tokens, request_id)
        if n:
            self._drop(request_id)
            self.states[request_id] = state
        return n

    @property
    def num_states(self) -> int:
        return len(self.states)

    def state_bytes(self) -> int:
        """Bytes held by the states of all live requests (a request in a slot counts as the equivalent
        ``SequenceState``: its entries in pages plus its fixed part; ``pool_bytes`` is what is allocated)."""
        return sum(st.nbytes() for st in self.states.values())

    def pool_bytes(self) -> int:
        """Bytes allocated for state: the slot decoder's page pools, fixed slot buffers and page table (0
        without it)."""
        if self.slots is None:
            return 0
        st = self.slots.state
        return st.pools.nbytes() + st.nbytes() + st.page_table.numel() * st.page_table.element_size()

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput, transfers=None) -> StepOutput:
        self.tiers_apply(transfers)
        for rid in so.preempted:            # restarts from position 0 (recompute)
            self._drop(rid)
        out = StepOutput()
        batched, greedy = {}, {}
        if self.batch_decode and hasattr(self.model, "decode_batch"):
            batched, greedy = self._decode_rows(so.scheduled)
        rows: list[torch.Tensor] = []
        reqs, toks = [], []
        for i, s in enumerate(so.scheduled):        # rows stay in scheduled order (the sampler's order)
            last = batched[i] if i in batched else self._run_chunk(s, out)
            if last is not None and s.samples:
                rows.append(last)
                reqs.append(s.request)
                toks.append(greedy.get(i))
        if not reqs:
            return out
        logits = torch.stack(rows).float()
        tokens = torch.stack(toks) if all(t is not None for t in toks) else None    # greedy, from the graph
        sample_requests(self.sampler, reqs, logits, out.sampled, out.logprobs, tokens)
        return out

    def _decode_rows(self, scheduled: list[ScheduledRequest]) -> tuple[dict[int, torch.Tensor], dict]:
        """Run every one-token chunk that continues a stored state (decode steps, also a one-token
        chunk of a prompt) in one pass (the slot decoder / its CUDA graph, else ``decode_batch``);
        returns scheduled index -> its logits row, and -> its greedy token (slot decoder only).
        Chunks that need prompt logprobs, prefills and longer chunks are left to ``_run_chunk``."""
        picked = [i for i, s in enumerate(scheduled)
                  if s.num_tokens == 1 and s.start > 0 and _prompt_logprob_range(s.request, s) is None
                  and (st := self.states.get(s.request.request_id)) is not None and st.num_tokens == s.start]
        if not picked:
            return {}, {}
        reqs = [scheduled[i].request for i in picked]
        ids = torch.tensor([r.all_token_ids[scheduled[i].start] for i, r in zip(picked, reqs)],
                           dtype=torch.int64, device=self.device)
        cache = self.prefix_cache
        if self.slots is not None and len(reqs) <= self.slots.slots and all(
                self.slots.fits(scheduled[i].start + 1) for i in picked):
            logits, greedy = self.slots.decode(self.states, [r.request_id for r in reqs], ids,
                                               [scheduled[i].page_table for i in picked])
            for r in reqs:
                n = self.states[r.request_id].num_tokens
                if cache is not None and cache.is_boundary(n):
                    cache.store(r.request_id, r.all_token_ids, self.slots.export(r.request_id))
            return {i: logits[j] for j, i in enumerate(picked)}, {i: greedy[j] for j, i in enumerate(picked)}
        logits, states = self.model.decode_batch(ids, [self._take_state(r.request_id) for r in reqs])
        for i, r, st in zip(picked, reqs, states):
            self.states[r.request_id] = st
            if cache is not None and cache.is_boundary(st.num_tokens):
                cache.store(r.request_id, r.all_token_ids, st)
        return {i: logits[j] for j, i in enumerate(picked)}, {}

    def _run_chunk(self, s: ScheduledRequest, out: StepOutput) -> torch.Tensor | None:
        """Run one request's chunk, store its new state; returns the logits row to sample from (if any)."""
        req = s.request
        rid = req.request_id
        ids = torch.tensor(req.all_token_ids[s.start:s.end], dtype=torch.int64, device=self.device)
        plp = _prompt_logprob_range(req, s)
        first = s.num_tokens - 1 if s.samples else s.num_tokens     # first row whose logits are needed
        if plp is not None:
            first = min(first, plp[0] - s.start)
        state = None
        if s.start > 0:
            state = self._take_state(rid)
            if state is None or state.num_tokens != s.start:
                have = None if state is None else state.num_tokens
                raise RuntimeError(f"request {rid!r}: chunk starts at token {s.start} but the stored state "
                                   f"covers {have} tokens")
        cache = self.prefix_cache
        # split at prefix-unit boundaries so that the state exactly there exists (not when prompt logprobs
        # need the rows of the whole chunk: then only a chunk ending on a boundary is stored)
        cuts = cache.cuts(s.start, s.end) if cache is not None and plp is None else []
        a = s.start
        for b in [*cuts, s.end]:
            piece = ids[a - s.start:b - s.start]
            lf = max(0, first - (a - s.start)) if b == s.end else b - a      # only the last piece's rows
            if state is None:
                logits, state = self.model.prefill(piece, logits_from=lf)
            else:
                logits, state = self.model.forward_step(piece, state, logits_from=lf)
            if cache is not None and cache.is_boundary(b):
                cache.store(rid, req.all_token_ids, state)
            a = b
        self.states[rid] = state
        if plp is not None:
            lo, hi = plp
            out.prompt_logprobs[rid] = self._prompt_logprobs(req, logits[lo - s.start - first:hi - s.start - first], lo)
        return logits[-1] if s.samples else None

    def _prompt_logprobs(self, req, logits: torch.Tensor, pos0: int) -> list[dict[int, float]]:
        return prompt_logprob_rows(req, logits, pos0)

