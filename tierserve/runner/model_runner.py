"""ModelRunner: owns the model, the KV storage and every device tensor of a step.

``execute(SchedulerOutput) -> StepOutput``: builds positions / slot mapping / page tables
(``AttnMetadata``), runs the model, computes logits only for rows that need them, samples on the
device and returns plain Python results (one host sync per step).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import logging

import torch

from tierserve.attention.backend import AttnMetadata
from tierserve.attention.torch_ref import TorchRefBackend
from tierserve.config import EngineConfig
from tierserve.engine.scheduler import SchedulerOutput
from tierserve.kv.layout import KVCache, KVLayout
from tierserve.models.config import ModelConfig
from tierserve.runner import engram_state, multi_step
from tierserve.runner.build import build_model
from tierserve.runner.cuda_graphs import decode_splits
from tierserve.runner.sampler import Sampler, prompt_logprob_rows, sample_requests
from tierserve.runner.step_inputs import prepare_step
from tierserve.runner.tier_link import TierLink

log = logging.getLogger("tierserve")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return {"float16": torch.float16}.get(model_cfg.torch_dtype, torch.bfloat16)


class ModelRunner(TierLink):
    def __init__(self, config: EngineConfig, model_path: Path, model_cfg: ModelConfig, max_model_len: int,
                 progress: bool = False) -> None:
        self.config = config
        self.model_cfg = model_cfg
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, model_cfg, self.device)
        self.backend = _make_backend(config.attention_backend, self.device)
        model = build_model(config, model_cfg, model_path, self.backend, max_model_len, self.device, self.dtype,
                            progress)
        self.model = model.eval()
        self.sparse = None
        if config.sparse_attention:
            from tierserve.attention.select import SparseConfig
            self.sparse = SparseConfig(config.sparse_attention, config.sparse_topk_tokens,
                                       page_spread=float(config.sparse_page_spread))
        use_index = self.sparse is not None and self.sparse.selector == "indexer"
        if use_index:                 # trained lightning indexers; their keys are paged beside the KV
            from tierserve.attention.indexer import IndexerSet
            self.model.attach_indexers(IndexerSet.load(config.indexer_path or model_path / "indexer",
                                                       self.device, self.dtype))
        pages_summary = self.sparse is not None and self.sparse.selector == "pages"
        self.layout = KVLayout(model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim,
                               config.page_size, self.dtype, summary_rows=1 if pages_summary else 0)
        self._index_page_bytes = (model_cfg.num_layers * config.page_size * model_cfg.head_dim *
                                  self.dtype.itemsize) if use_index else 0
        self.num_pages = self._num_pages(max_model_len)
        self.num_compact_pages = 0         # FP8 part 2: compact slots, page ids num_pages + 1 + slot
        if config.kv_dtype == "fp8":
            from tierserve.runner.kv_fp8 import plan_storage
            budget = self.num_pages
            self.num_pages, self.num_compact_pages = plan_storage(
                config, self.layout, budget, self.layout.bytes_per_page + self._index_page_bytes, use_index)
        # one extra page that the pool never hands out: CUDA-graph padding rows write there
        self.scratch_page = self.num_pages
        self.kv = KVCache(self.layout, self.num_pages + 1, self.device)
        self.index_keys = torch.zeros(self.num_pages + 1, model_cfg.num_layers, config.page_size, model_cfg.head_dim,
                                      dtype=self.dtype, device=self.device) if use_index else None
        self.fp8 = None                    # FP8 KV pages (quantised in place or moved to compact slots)
        if config.kv_dtype == "fp8":
            from tierserve.runner.kv_fp8 import make_fp8_pages
            self.fp8 = make_fp8_pages(config, self.layout, self.num_pages, self.num_compact_pages, self.device)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.engram_hasher = None          # set by set_tokenizer for models with Engram
        self.engram_conv = None            # Engram conv history per request (conv_kernel_size > 0)
        self.device_engram = None          # Engram hashed and gathered on the device (graphs, multi-step)
        if model_cfg.engram is not None:
            from tierserve.memory.engram import engram_modules
            from tierserve.runner.engram_graphs import DeviceEngram
            mods = engram_modules(self.model)
            self.engram_conv = engram_state.EngramConvStates(mods)
            if DeviceEngram.supports(mods):
                self.device_engram = DeviceEngram(mods, model_cfg.engram.lookback, config.max_num_seqs, self.device)
        self.supports_prefix_caching = not self.engram_conv      # conv history is not paged
        self.host_kv: torch.Tensor | None = None     # CPU-RAM page storage for spilled live pages (tiers)
        self.spill = None                            # SpillState of spilled pages (TierLink.attach_spill)
        self._tiers = None                           # the tier manager whose transfers tiers_apply runs
        self.graphs = None
        self.step_kinds: dict[str, int] = {}         # decode steps run by: "plain" / "spill" graphs, "eager"
        if self.device.type == "cuda" and not config.enforce_eager and self.backend.name == "triton" \
                and (self.sparse is None or self.sparse.selector == "pages"):
            from tierserve.runner.cuda_graphs import DecodeGraphs
            graph_engram = None
            if self.device_engram is not None:
                graph_engram = self.device_engram
            elif model_cfg.engram is not None and not self.engram_conv:
                from tierserve.runner.engram_graphs import StaticEngramRows
                graph_engram = StaticEngramRows(engram_modules(self.model), config.max_num_seqs, self.device,
                                                self.dtype)
            self.graphs = DecodeGraphs(self.model, self.kv, config.page_size, config.max_num_seqs,
                                       max_model_len, self.scratch_page, self.device, kv_fp8=self.fp8,
                                       engram=graph_engram, sparse=self.sparse)
            if self.device_engram is None:        # else once the hasher exists (set_tokenizer)
                self._capture_graphs()
        self.max_model_len = max_model_len
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if self.device.type == "cuda" else 132

    def recapture_graphs(self) -> None:
        """Capture the decode graphs again (no-op without graphs): call after changing the model's kernels
        (``model.enable_fused(...)``) once the engine exists, or the replays keep running the old ones."""
        if self.graphs is not None:
            self.graphs.reset()
            torch.cuda.synchronize(self.device)
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        try:
            self.graphs.capture()
        except Exception as e:       # a kernel that fails to build must not take the engine down
            log.warning("CUDA-graph / Triton decode setup failed (%s: %s); falling back to the "
                        "torch reference backend without graphs", type(e).__name__, e)
            self.graphs = None
            self.backend = _make_backend("torch_ref", self.device)
            for layer in self.model.layers:
                layer.self_attn.backend = self.backend

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV pool holds (full-precision pages + compact FP8 slots)."""
        return (self.num_pages + self.num_compact_pages) * self.config.page_size

    def _num_pages(self, max_model_len: int) -> int:
        c, per_page = self.config, self.layout.bytes_per_page + self._index_page_bytes
        if c.num_kv_pages is not None:
            return c.num_kv_pages
        if c.gpu_kv_gb is not None:
            return max(1, int(c.gpu_kv_gb * 2**30 // per_page))
        if self.device.type == "cuda":
            gc.collect()                  # engines dropped earlier in this process give their memory back
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - c.gpu_memory_utilization) * total - 2 * 2**30   # 2 GiB for activations/graphs
            return max(1, int(budget // per_page) - 1)
        want = c.max_num_seqs * max_model_len * self.layout.bytes_per_token
        return max(1, int(min(want, 2 * 2**30) // per_page))

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput, transfers=None) -> StepOutput:
        if transfers is not None:
            self.tiers_apply(transfers, overlap=True)
        meta, input_ids, sample_rows, plp = self._prepare(so)
        if self.fp8 is not None:
            self.fp8.on_write(meta.slot_pages)
        out = StepOutput()
        greedy = None
        graph = self._graph_kind(meta, plp)
        if meta.decode_only:
            kind = graph or "eager"
            self.step_kinds[kind] = self.step_kinds.get(kind, 0) + 1
        if graph is not None:
            self.kv.settle()                        # a graph reads every layer: hit pages in place first
            if self.device_engram is not None:      # the graph hashes and gathers; it needs the history
                self.device_engram.load(meta.num_seqs, engram_state.history_rows(so, self.model_cfg.engram.lookback),
                                        self.graphs.bucket_for(meta.num_seqs))
            elif self.graphs.engram is not None:    # rows gathered now, read by the graph from static buffers
                self.graphs.engram.fill(self._engram_step(so, input_ids, meta), meta.num_seqs)
            logits = self.graphs.run(meta.num_seqs, input_ids, meta.positions, meta.slot_pages,
                                     meta.slot_offsets, meta.seq_lens, meta.page_table, spill=graph == "spill")
            greedy = self.graphs.next_tokens[:meta.num_seqs]
        else:
            engram = self._engram_step(so, input_ids, meta) if self.engram_hasher is not None else None
            hidden = self.model(input_ids, meta.positions, self.kv, meta, engram)
            self.kv.settle()
            if engram is not None and self.engram_conv:
                self.engram_conv.store(so, engram.new_conv_state)
            if plp:
                self._prompt_logprobs(hidden, plp, out)
            if not sample_rows:
                return out
            rows = [r for r, _ in sample_rows]
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]).float()
        reqs = [s.request for _, s in sample_rows]
        sample_requests(self.sampler, reqs, logits, out.sampled, out.logprobs, greedy)
        return out

    def _graph_kind(self, meta: AttnMetadata, plp) -> str | None:
        """Which CUDA graphs replay this step: "plain", "spill" (captured with the tiers' spill stores) or
        None (eager)."""
        g = self.graphs
        if not (meta.decode_only and g is not None and not plp and g.bucket_for(meta.num_seqs) is not None
                and (self.engram_hasher is None or g.engram is not None)):
            return None
        # no spilled page in the step, and no sparse selections to count for the tiers: the plain graphs
        if meta.host_kv is None and (self.sparse is None or self.spill is None):
            return "plain"
        # every spilled page in CPU RAM (not the disk spill file): the spill graphs, if captured
        if g.spill is not None and g.spill_graphs and (meta.host_kv is None or meta.host_ram_only):
            return "spill"
        return None

    def decode_splits(self, bs: int) -> int:
        """Split-K factor of a pure decode step: the CUDA graphs' choice, also on the eager path (same bits)."""
        return decode_splits(bs, self.model_cfg.num_kv_heads, self.max_model_len, self.config.max_num_seqs,
                             self.num_sms, self.sparse, self.config.page_size, self.fp8 is not None)

    def supports_multi_step(self) -> bool:
        """Greedy tokens can be fed back on the device (no Engram hashing or spilled pages, and sparse
        selection only without KV tiers: those need the host between steps; "pages" selection runs on the
        device from the page summaries). FP8 KV pages are fine: pages that become FP8-readable
        during the k steps are quantised only afterwards, and until then read through an on-the-fly
        quantisation that gives the same numbers."""
        tiered = multi_step.TIERED          # KV tiers: windows over spilled pages (runner/multi_step.py)
        sparse_ok = self.sparse is None or (self.sparse.selector == "pages" and (self.spill is None or tiered))
        engram_ok = self.engram_hasher is None or self.device_engram is not None
        return sparse_ok and engram_ok and (self.host_kv is None or tiered)

    @torch.inference_mode()
    def execute_multi(self, so: SchedulerOutput, steps: int) -> list[list[int]]:
        """``steps`` greedy decode steps for a pure-decode batch whose page tables already cover
        ``steps`` new positions; each step's argmax is the next step's input. One host sync.
        Returns the tokens [request][step] (the caller drops those after a stop)."""
        return multi_step.collect(self.launch_multi(so, steps))

    @torch.inference_mode()
    def launch_multi(self, so: SchedulerOutput, steps: int) -> multi_step.Window:
        """Queue a multi-step window without waiting for it (runner/multi_step.py)."""
        return multi_step.launch(self, so, steps)

    @torch.inference_mode()
    def extend_multi(self, window: multi_step.Window, steps: int, tables: list[list[int]]) -> multi_step.Window:
        return multi_step.extend(self, window, steps, tables)

    collect_multi = staticmethod(multi_step.collect)

    def release(self, request_id: str) -> None:
        """A request finished or was aborted: drop its per-request state; its last pages are written
        through to the lower tiers now, not at a next step that may never come."""
        if self.engram_conv:
            self.engram_conv.release(request_id)
        if self._tiers is not None:
            self._tiers.write_pending()

    def set_tokenizer(self, tokenizer) -> None:
        """Models with Engram hash canonical token ids, which come from the tokenizer."""
        if self.model_cfg.engram is not None:
            self.engram_hasher = engram_state.make_hasher(self.model_cfg, tokenizer)
            if self.device_engram is not None:
                self.device_engram.hasher = self.engram_hasher
                if self.graphs is not None and not self.graphs.graphs:
                    self._capture_graphs()

    def _engram_step(self, so: SchedulerOutput, input_ids: torch.Tensor, meta: AttnMetadata):
        return engram_state.start_step(self.model, self.engram_hasher, self.engram_conv, so, input_ids, meta,
                                       self.model_cfg.engram.lookback, self.device, self.dtype)

    def _prepare(self, so: SchedulerOutput, lookahead: int = 0):
        """Step inputs (``step_inputs.prepare_step``); ``lookahead`` widens the page tables (multi-step)."""
        return prepare_step(self, so, lookahead)

    def _prompt_logprobs(self, hidden: torch.Tensor, plp, out: StepOutput) -> None:
        for req, row, n, pos0 in plp:
            logits = self.model.compute_logits(hidden[row:row + n])
            out.prompt_logprobs[req.request_id] = prompt_logprob_rows(req, logits, pos0)


def _make_backend(name: str, device: torch.device):
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch_ref"
    if name == "triton":
        from tierserve.attention.triton_backend import TritonBackend
        return TritonBackend()
    return TorchRefBackend()
