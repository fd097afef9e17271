"""What the StatefulRunner (runner/stateful_runner.py) refuses, its stand-ins for the paged runner's KV
hooks, how big its state page pool is, and how it loads each architecture it serves."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tierserve.config import EngineConfig

log = logging.getLogger("tierserve")

if TYPE_CHECKING:
    from tierserve.engine.scheduler import ScheduledRequest


# Engine settings that need paged K/V (or a model this runner does not have) -> why they are refused.
_UNSUPPORTED = {
    "sparse_attention": "page-sparse attention needs paged K/V (V4 has its own sparse indexer)",
    "cpu_kv_gb": "KV tiers move Llama-layout pages; V4's state pages are not tiered yet",
    "disk_kv_dir": "KV tiers move Llama-layout pages; V4's state pages are not tiered yet",
    "remote_kv_url": "KV tiers move Llama-layout pages; V4's state pages are not tiered yet",
    "quantization": "weight quantisation on load is implemented for the Llama family only",
    "engram_placement": "the model has no Engram",
}


def check_config(config: EngineConfig, architecture: str) -> None:
    """Refuse, naming the setting, what this runner cannot do (rather than silently ignore it)."""
    for name, why in _UNSUPPORTED.items():
        value = getattr(config, name)
        if value is not None:
            raise ValueError(f"{name}={value!r} is not supported for {architecture} yet: {why} "
                             "(docs/deepseek_v4.md, 'In the engine')")
    if config.attention_backend == "triton":
        raise ValueError(f"attention_backend='triton' is not available for {architecture}: it runs its "
                         "own plain-PyTorch attention; use attention_backend='auto'")


class NoPagedKV:
    """``runner.kv`` for the engine's FP8 page hook: there is no paged K/V data."""
    data = None


class BookkeepingFp8:
    """Stands in for ``ModelRunner.fp8`` (``quantise(data, pids)`` / ``quantised``): V4's pages hold entries
    already stored in MODEL1 (``kv_dtype="fp8"``), so this marks the pages the engine hands over and
    converts nothing."""

    def __init__(self, num_pages: int) -> None:
        self.quantised = torch.zeros(num_pages, dtype=torch.bool)

    def quantise(self, data, pids) -> None:
        if len(pids):
            self.quantised[torch.as_tensor(list(pids), dtype=torch.long)] = True


# ---- slot decoding (runner/stateful_graphs.py) -------------------------------------------------------
MAX_SLOTS = 32            # decode rows in slot buffers / the largest CUDA-graph bucket


def setup_slots_refusal(model, config: EngineConfig) -> str | None:
    """Why the model's decode cannot run in slot buffers / CUDA graphs, or None."""
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(b.ffn, "forward_decode") for b in layers):
        return "the model has no graph-safe decode step"
    if config.cpu_experts or any(b.ffn.host_experts for b in layers):
        return "cpu_experts: the routed experts run on the host"
    return None


def make_slot_decoder(model, config: EngineConfig, max_model_len: int, device: torch.device, use_graphs: bool,
                      num_pages: int | None = None):
    """A ``SlotDecoder`` of up to ``min(max_num_seqs, MAX_SLOTS)`` slots of ``max_model_len`` tokens whose
    compressed entries live in a pool of ``num_pages`` pages (the engine's page budget, already sized to
    the memory; see ``pool_pages``); fewer slots where their fixed buffers would take more
    than a quarter of the free device memory (ValueError: not even one)."""
    from tierserve.models.deepseek_v4.dummy import free_bytes
    from tierserve.models.deepseek_v4.paged_state import PagePools
    from tierserve.models.deepseek_v4.static_state import StaticState
    from tierserve.runner.stateful_graphs import SlotDecoder

    slots = min(config.max_num_seqs, MAX_SLOTS)
    per_slot = StaticState.estimate_bytes(model, 1, max_model_len)
    pool = 0 if num_pages is None else (num_pages + 1) * PagePools.page_bytes(model, config.page_size)
    free = free_bytes(device)
    if free is not None:
        if pool > free:
            raise ValueError(f"the page pool ({num_pages} pages, {pool / 2**30:.2f} GiB) does not fit the "
                             f"free device memory ({free / 2**30:.2f} GiB)")
        slots = min(slots, int(0.25 * (free - pool)) // max(per_slot, 1))
    if slots < 1:
        raise ValueError(f"one decode slot needs {per_slot / 2**30:.1f} GiB of fixed buffers, more than a "
                         "quarter of the free device memory")
    return SlotDecoder(model, slots, max_model_len, device, use_graphs, num_pages, config.page_size)


# ---- the page budget ---------------------------------------------------------------------------------
# Without any growing state (sliding-window-only layers) pages only count tokens: one PageMeta object per
# page is the whole cost, but a 1M-token max_model_len times 128 sequences would still be 8M of them.
MAX_ACCOUNTING_PAGES = 1 << 20
CUDA_RESERVE = 2 * 2**30          # activations, graphs, the slot decoder's step buffers (as ModelRunner)


def pool_pages(model, config: EngineConfig, max_model_len: int, device: torch.device) -> tuple[int, int, int]:
    """``(num_pages, bytes per page, fixed bytes per request)`` of the V4 state pool.

    A page of ``page_size`` tokens holds, over all layers, the compressed entries and indexer keys whose
    windows end in its tokens (``PagePools.page_bytes``); every request also holds a fixed-size "state
    page" (window rings, open compressor windows, Ca halves: ``StaticState.estimate_bytes`` per slot).
    The budget is ``num_kv_pages`` if given, else ``gpu_kv_gb``, else (CUDA) what
    ``gpu_memory_utilization`` leaves of the device after the weights, less 2 GiB, else (CPU)
    ``max_num_seqs * max_model_len`` tokens' worth capped at 2 GiB; ``max_num_seqs`` fixed state pages
    are taken out of it first and the rest is pages (one of them the scratch page), at most the
    ``max_num_seqs * ceil(max_model_len / page_size)`` that can ever be in use."""
    from tierserve.models.deepseek_v4.paged_state import PagePools
    from tierserve.models.deepseek_v4.static_state import StaticState

    c = config
    fixed = StaticState.estimate_bytes(model, 1, max_model_len)
    try:
        per_page = PagePools.page_bytes(model, c.page_size)
    except ValueError as e:         # a compress ratio and the page size that do not divide one another
        log.warning("the state is not paged (%s); pages only count tokens, decode runs without slots", e)
        per_page = 0
    if c.num_kv_pages is not None:
        return c.num_kv_pages, per_page, fixed
    if per_page == 0:
        return max(2, min(-(-c.max_num_seqs * max_model_len // c.page_size), MAX_ACCOUNTING_PAGES)), 0, fixed
    # the fixed state pages of max_num_seqs requests, and the slots' positions and page-table rows
    reserved = c.max_num_seqs * fixed + min(c.max_num_seqs, MAX_SLOTS) * (-(-max_model_len // c.page_size) + 1) * 8
    if c.gpu_kv_gb is not None:
        budget, what = c.gpu_kv_gb * 2**30, f"gpu_kv_gb={c.gpu_kv_gb}"
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - c.gpu_memory_utilization) * total - CUDA_RESERVE
        what = f"gpu_memory_utilization={c.gpu_memory_utilization} ({free / 2**30:.1f} GiB free)"
    else:
        want = (-(-max_model_len // c.page_size) * c.max_num_seqs + 1) * per_page + reserved   # + scratch
        budget, what = min(want, 2 * 2**30), "the CPU default (2 GiB at most)"
    pages = int((budget - reserved) // per_page) - 1
    # pages are never shared between V4 requests, so more than max_num_seqs full-length sequences' worth is
    # never used (and tiny models would otherwise get millions of pages of bookkeeping)
    useful = c.max_num_seqs * -(-max_model_len // c.page_size)
    if pages > useful:
        log.info("state pool capped at %d pages (max_num_seqs=%d sequences of max_model_len=%d); the budget "
                 "(%s) would allow %d", useful, c.max_num_seqs, max_model_len, what, pages)
        pages = useful
    if pages < 2:
        raise ValueError(f"{what} leaves no room for state pages: the fixed state of max_num_seqs="
                         f"{c.max_num_seqs} requests takes {reserved / 2**20:.1f} MiB ({fixed / 2**20:.2f} MiB "
                         f"each) and a page of {c.page_size} tokens {per_page} B; raise the budget or lower "
                         "max_num_seqs")
    return pages, per_page, fixed


def make_prefix_cache(model_cfg, config: EngineConfig, dtype: torch.dtype, num_pages: int, device: torch.device):
    """The runner's ``StateCache``: a snapshot every prefix unit; ``prefix_cache_gb`` or, by default, a quarter
    of what the states of a full pool would need (tokens + fixed per request), at most a quarter of the free
    memory now."""
    from tierserve.models.deepseek_v4.dummy import free_bytes
    from tierserve.models.deepseek_v4.kv_bytes import state_bytes
    from tierserve.runner.state_cache import StateCache, choose_unit

    c, cfg = config, model_cfg.model
    unit = choose_unit(c.prefix_unit, c.page_size, [cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers)])
    if c.prefix_cache_gb is not None:
        budget = int(c.prefix_cache_gb * 2**30)
    else:
        esize = torch.empty(0, dtype=dtype).element_size()
        scale = esize / 2                       # the bf16 layout: 2-byte values
        if c.kv_dtype == "fp8":                 # MODEL1 entries / keys (bytes as stored), window in dtype
            sb = state_bytes(cfg, "model1", buffer_dtype_bytes=esize, window_layout="bf16")
            per_token, window = sb.per_token, sb.window
        else:
            sb = state_bytes(cfg, buffer_dtype_bytes=esize)
            per_token, window = sb.per_token * scale, sb.window * scale
        pool = per_token * num_pages * c.page_size + c.max_num_seqs * (window + sb.buffers)
        budget = int(0.25 * pool)
        free = free_bytes(device)
        if free is not None:
            budget = min(budget, free // 4)
    log.info("%s prefix cache: a state snapshot every %d tokens, %.2f GiB", model_cfg.architecture, unit,
             budget / 2**30)
    return StateCache(unit, c.page_size, budget)


# ---- model loading ------------------------------------------------------------------------------
def _load_deepseek_v4(path: Path, model_cfg, config: EngineConfig, dtype: torch.dtype, device: torch.device):
    from tierserve.models.deepseek_v4 import load_model

    # --cpu-experts: load into CPU RAM, then move all but the routed experts to the device (dummy weights:
    # the routed experts are allocated in CPU RAM and the rest on the device from the start)
    if config.load_format == "dummy":
        from tierserve.models.deepseek_v4.dummy import random_deepseek_v4
        model = random_deepseek_v4(model_cfg.model, config.seed, dtype, device, host_experts=config.cpu_experts)
    else:
        model = load_model(path, dtype=dtype, device=torch.device("cpu") if config.cpu_experts else device)
    return model.place(device, cpu_experts=True) if config.cpu_experts else model


LOADERS = {"DeepseekV4ForCausalLM": _load_deepseek_v4}


def prompt_logprob_range(req, s: "ScheduledRequest") -> tuple[int, int] | None:
    """Positions ``[lo, hi)`` of this chunk whose next token is a prompt token without a logprob yet."""
    if req.prompt_logprobs is None:
        return None
    lo = max(s.start, len(req.prompt_logprobs) - 1)
    hi = min(s.end, req.num_prompt_tokens - 1)
    return (lo, hi) if hi > lo else None
