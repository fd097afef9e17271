"""Engine configuration: one place for every engine setting and its default.

A setting has one name everywhere: CLI flag ``--foo-bar``, ``LLM(foo_bar=...)`` and
``EngineConfig.foo_bar``. Values are validated in ``__post_init__`` with errors that name the field.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
ATTENTION_BACKENDS = ("auto", "torch_ref", "triton")

# Default page size: 16 tokens. Small enough that prefix-cache hits and sparse page selection stay
# fine-grained (a page is the unit of both), large enough that one page of an 8B model across all
# layers is 2 MiB (page-major layout below) -- a good unit for PCIe/disk transfer -- and one page of
# one layer and KV head is 4 KiB for bf16, the smallest piece the H200 zero-copy gather still
# reads at full PCIe speed (see DESIGN.md).
DEFAULT_PAGE_SIZE = 16


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class EngineConfig:
    model: str | None = None            # path to a HF checkpoint dir; None = embedded tierserve-nano
    tokenizer: str | None = None        # defaults to the model dir
    dtype: str = "auto"                 # auto: checkpoint dtype on GPU, float32 on CPU
    device: str = "auto"                # auto: cuda when available
    max_model_len: int | None = None    # defaults to the model's max_position_embeddings
    seed: int = 0
    page_size: int = DEFAULT_PAGE_SIZE
    num_kv_pages: int | None = None     # explicit KV pool size in pages (overrides memory sizing)
    gpu_kv_gb: float | None = None      # KV pool size in GiB on the compute device
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 2048  # token budget per engine step (chunked prefill)
    max_num_seqs: int = 128             # cap on running requests
    enable_prefix_caching: bool = True
    # models with an explicit per-request state (DeepSeek-V4): state snapshots every prefix_unit tokens
    # (None: 1024 rounded to the page size and compress ratios) in a cache of prefix_cache_gb GiB
    # (None: a quarter of what the KV pool would hold, at most a quarter of free memory)
    prefix_unit: int | None = None
    prefix_cache_gb: float | None = None
    load_format: str = "auto"
    cpu_experts: bool = False           # MoE models: routed experts in (pinned) CPU RAM, computed on the CPU
    cpu_kv_gb: float | None = None      # host tier (pinned CPU RAM) for KV pages below the GPU pool; with
                                        # kv_dtype=fp8 it holds spilled live pages only (compact FP8 rows)
    disk_kv_dir: str | None = None      # disk tier directory (context caching across restarts)
    disk_kv_gb: float = 64.0            # disk tier capacity
    remote_kv_url: str | None = None    # redis://host:port -- KV shared between replicas
    kv_load_policy: str = "cost"        # cost: load a lower-tier hit only if faster than recompute; always
    kv_prefetch: bool | None = None     # read waiting requests' disk/remote hits ahead (None: on with those tiers)
    kv_load_overlap: bool = True        # CUDA: CPU-RAM hits copied layer by layer beside the forward pass
    sparse_attention: str | None = None  # pages: top-k pages by key min/max bounds (lossy, opt-in)
    sparse_topk_tokens: int = 2048      # tokens each query reads once the context is longer
    sparse_page_spread: float = 1.0     # pages selector: page score q.c + s |q|.r from the key min / max (c midpoint,
                                        # r half range); 1 = the upper bound (Quest), smaller ranks by the midpoint more
    indexer_path: str | None = None     # sparse_attention=indexer: dir from `tierserve train-indexer` (default <model>/indexer)
    kv_dtype: str = "auto"              # fp8: FP8 (e4m3) KV pages, sink + recent tokens at full precision (lossy)
    kv_fp8_keep_sink: int = 16          # first tokens of each sequence always read at full precision
    kv_fp8_keep_recent: int = 64        # most recent tokens (per query) always read at full precision
    kv_fp8_storage: str = "auto"        # compact (FP8 pages in a uint8 pool: ~2x tokens) | inplace (part 1, no saving);
                                        # auto: compact unless sparse attention is on (its fused
                                        # selection and CUDA graphs read in-place pages only) or the
                                        # budget leaves the compact pool under 25% more room
    quantization: str | None = None     # fp8: quantise bf16 weights on load (128x128 block-scaled e4m3)
    fp8_lm_head: bool = False           # with quantization=fp8: the output projection in FP8 too (lossy; a tied
                                        # embedding table keeps its bf16 copy for the input and gains an FP8 one)
    engram_placement: str | None = None  # device | cpu | disk: where Engram tables live (default: config)
    attention_backend: str = "auto"     # auto: triton on CUDA, torch_ref on CPU
    enforce_eager: bool = False         # True: no CUDA graphs
    fused_ops: bool = True              # CUDA: Triton kernels for add+RMSNorm, rotary+KV write, SiLU*mul
    decode_gemv: bool = False           # CUDA: Triton skinny GEMM (RMSNorm / residual fused) for <= 16 decode rows
    # greedy decode steps run back to back on the device (each feeds its token to the next) before one
    # host sync; used only when every running request is a plain greedy decode and nothing waits. Output
    # is identical; streaming arrives in chunks of up to this many tokens. 1 = sync after every step.
    num_scheduler_steps: int = 8
    debug_invariants: bool = field(default_factory=lambda: _env_flag("TIERSERVE_DEBUG_INVARIANTS"))

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("kv_load_policy", self.kv_load_policy, ("cost", "always"))
        if not isinstance(self.cpu_experts, bool):
            raise ValueError(f"cpu_experts must be True or False, got {self.cpu_experts!r}")
        if not isinstance(self.kv_load_overlap, bool):
            raise ValueError(f"kv_load_overlap must be True or False, got {self.kv_load_overlap!r}")
        if self.kv_prefetch is not None and not isinstance(self.kv_prefetch, bool):
            raise ValueError(f"kv_prefetch must be True, False or None (auto), got {self.kv_prefetch!r}")
        _choice("kv_dtype", self.kv_dtype, ("auto", "fp8"))
        _int_range("kv_fp8_keep_sink", self.kv_fp8_keep_sink, 0, 1 << 24)
        _int_range("kv_fp8_keep_recent", self.kv_fp8_keep_recent, 0, 1 << 24)
        _choice("kv_fp8_storage", self.kv_fp8_storage, ("auto", "compact", "inplace"))
        if self.kv_dtype == "fp8":
            # cpu_kv_gb works: live pages spill to CPU RAM as compact FP8 rows (no prefix caching in CPU RAM)
            for name in ("disk_kv_dir", "remote_kv_url"):
                if getattr(self, name) is not None:
                    raise ValueError(f"kv_dtype='fp8' cannot be combined with {name} yet (issue 6): only "
                                     "cpu_kv_gb (live pages spilled to CPU RAM as compact FP8 rows) works with it")
        if self.quantization is not None:
            _choice("quantization", self.quantization, ("fp8",))
        if not isinstance(self.fp8_lm_head, bool):
            raise ValueError(f"fp8_lm_head must be True or False, got {self.fp8_lm_head!r}")
        if self.fp8_lm_head and self.quantization != "fp8":
            raise ValueError("fp8_lm_head needs quantization='fp8' (it quantises the output projection as well)")
        if self.engram_placement is not None:
            _choice("engram_placement", self.engram_placement, ("device", "cpu", "disk"))
        if self.sparse_attention is not None:
            _choice("sparse_attention", self.sparse_attention, ("pages", "indexer"))
            if self.sparse_attention == "indexer":
                for name in ("cpu_kv_gb", "disk_kv_dir", "remote_kv_url"):
                    if getattr(self, name) is not None:
                        raise ValueError(f"sparse_attention='indexer' cannot be combined with {name} yet: the "
                                         "index keys do not move between tiers")
            _int_range("sparse_topk_tokens", self.sparse_topk_tokens, 1, 1 << 24)
        v = self.sparse_page_spread
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"sparse_page_spread must be a number in [0, 1], got {v!r}")
        if self.prefix_unit is not None:
            _int_range("prefix_unit", self.prefix_unit, 1, 1 << 24)
        for name in ("cpu_kv_gb", "disk_kv_gb", "prefix_cache_gb"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ValueError(f"{name} must be a positive number of GiB, got {v!r}")
        if self.remote_kv_url is not None and not str(self.remote_kv_url).startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"remote_kv_url must be a redis:// URL, got {self.remote_kv_url!r}")
        _int_range("page_size", self.page_size, 1, 4096)
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        _int_range("max_num_batched_tokens", self.max_num_batched_tokens, 1, 1 << 24)
        _int_range("max_num_seqs", self.max_num_seqs, 1, 1 << 16)
        _int_range("num_scheduler_steps", self.num_scheduler_steps, 1, 1024)
        _int_range("seed", self.seed, 0, (1 << 63) - 1)
        if self.max_model_len is not None:
            _int_range("max_model_len", self.max_model_len, 1, 1 << 24)
        if self.num_kv_pages is not None:
            _int_range("num_kv_pages", self.num_kv_pages, 1, 1 << 31)
        if self.gpu_kv_gb is not None and not (isinstance(self.gpu_kv_gb, (int, float)) and self.gpu_kv_gb > 0):
            raise ValueError(f"gpu_kv_gb must be a positive number, got {self.gpu_kv_gb!r}")
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kwargs)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _int_range(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
