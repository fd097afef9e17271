"""DeepseekV4Config: the fields of a DeepSeek-V4 config.json, validated in ``__post_init__``.

Reads both layouts found in the wild:

* the one transformers >= 5.17 writes (``layer_types``, ``mlp_layer_types``, ``compress_rates`` and a
  nested ``rope_parameters = {"main": {...}, "compress": {...}}``), and
* the original release layout (``compress_ratios`` per layer with 0 = sliding window only,
  ``num_hash_layers``, ``qk_rope_head_dim``, a flat ``rope_scaling`` / ``rope_parameters`` holding the
  YaRN settings of the compressed branch).

Every bad value raises ``ValueError`` naming the field and the allowed range.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve.models.deepseek_v4.rope import RopeSpec

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE, MOE = "hash_moe", "moe"
MLP_TYPES = (HASH_MOE, MOE)
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"DeepSeek-V4 config: {name}={value!r} is invalid; allowed: {allowed}")


@dataclass
class DeepseekV4Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    q_lora_rank: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    rope_main: RopeSpec
    rope_compress: RopeSpec
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    compress_ratio_csa: int = 4
    compress_ratio_hca: int = 128
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    expert_dtype: str | None = None           # "fp4" in checkpoints whose experts ship as FP4
    quantization: dict = field(default_factory=dict)   # config.json "quantization_config", if any

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "q_lora_rank", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
                    "compress_ratio_csa", "compress_ratio_hca", "hc_mult", "hc_sinkhorn_iters",
                    "sliding_window", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim",
                    "index_topk", "max_position_embeddings")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(name, v, "an integer >= 1")
        if self.n_shared_experts < 0:
            raise _bad("n_shared_experts", self.n_shared_experts, "an integer >= 0")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise _bad("num_experts_per_tok", self.num_experts_per_tok,
                       f"1..n_routed_experts ({self.n_routed_experts})")
        if self.num_attention_heads % self.o_groups:
            raise _bad("o_groups", self.o_groups, f"a divisor of num_attention_heads ({self.num_attention_heads})")
        if self.scoring_func not in SCORING_FUNCS:
            raise _bad("scoring_func", self.scoring_func, ", ".join(SCORING_FUNCS))
        for name in ("rms_norm_eps", "hc_eps", "swiglu_limit", "routed_scaling_factor"):
            if not float(getattr(self, name)) > 0:
                raise _bad(name, getattr(self, name), "a number > 0")
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_TYPES)):
            if len(types) != self.num_hidden_layers:
                raise _bad(name, list(types), f"a list of num_hidden_layers ({self.num_hidden_layers}) entries")
            bad = [t for t in types if t not in allowed]
            if bad:
                raise _bad(name, bad, ", ".join(allowed))
        for name, spec in (("rope_parameters.main", self.rope_main), ("rope_parameters.compress", self.rope_compress)):
            if spec.rope_dim > self.head_dim:
                raise _bad(f"{name}.partial_rotary_factor", spec.rope_dim, f"a rope dim <= head_dim ({self.head_dim})")
        if self.rope_compress.rope_dim > self.index_head_dim and CSA in self.layer_types:
            raise _bad("index_head_dim", self.index_head_dim, f">= the rope dim ({self.rope_compress.rope_dim})")

    # ------------------------------------------------------------------ derived
    @property
    def rope_head_dim(self) -> int:
        return self.rope_main.rope_dim

    def compress_ratio(self, layer: int) -> int:
        """0 for a sliding-window-only layer, else the pooling ratio of its compressor."""
        t = self.layer_types[layer]
        return 0 if t == SLIDING else self.compress_ratio_csa if t == CSA else self.compress_ratio_hca

    def rope_for(self, layer: int) -> RopeSpec:
        """Sliding-window layers rotate with the main rope, compressed layers with the compressed one."""
        return self.rope_main if self.layer_types[layer] == SLIDING else self.rope_compress

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekV4Config:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            return cls.from_hf(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: invalid JSON ({e})") from None

    @classmethod
    def from_hf(cls, cfg: dict) -> DeepseekV4Config:
        try:
            return cls._from_hf(cfg)
        except KeyError as e:
            raise ValueError(f"DeepSeek-V4 config.json is missing the field {e.args[0]!r}") from None

    @classmethod
    def _from_hf(cls, cfg: dict) -> DeepseekV4Config:
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise _bad("hidden_act", act, "silu")
        if int(cfg.get("num_key_value_heads", 1)) != 1:
            raise _bad("num_key_value_heads", cfg["num_key_value_heads"], "1 (V4 is shared-KV MQA)")
        n = int(cfg["num_hidden_layers"])
        head_dim = int(cfg.get("head_dim", 512))
        rates = dict(cfg.get("compress_rates") or {})
        csa = int(cfg.get("compress_rate_csa", rates.get(CSA, 4)))
        hca = int(cfg.get("compress_rate_hca", rates.get(HCA, 128)))
        layer_types = cfg.get("layer_types")
        if layer_types is None and cfg.get("compress_ratios") is not None:
            by_ratio = {0: SLIDING, csa: CSA, hca: HCA}
            ratios = list(cfg["compress_ratios"])[:n]
            bad = [r for r in ratios if r not in by_ratio]
            if bad:
                raise _bad("compress_ratios", bad, f"0, {csa} (CSA) or {hca} (HCA)")
            layer_types = [by_ratio[r] for r in ratios]
        if layer_types is None:   # transformers' default: 2 HCA, then HCA/CSA interleaved
            layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        mlp_types = cfg.get("mlp_layer_types")
        if mlp_types is None:
            n_hash = int(cfg.get("num_hash_layers", 3))
            mlp_types = [HASH_MOE] * min(n, n_hash) + [MOE] * max(0, n - n_hash)
        main, compress = _rope_specs(cfg, head_dim)
        quant = dict(cfg.get("quantization_config") or {})
        return cls(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]), num_hidden_layers=n,
            num_attention_heads=int(cfg["num_attention_heads"]), head_dim=head_dim,
            q_lora_rank=int(cfg["q_lora_rank"]), moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            n_routed_experts=int(cfg["n_routed_experts"]), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            layer_types=tuple(layer_types[:n]), mlp_layer_types=tuple(mlp_types[:n]),
            rope_main=main, rope_compress=compress,
            n_shared_experts=int(cfg.get("n_shared_experts", 1)),
            scoring_func=str(cfg.get("scoring_func", "sqrtsoftplus")),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.5)),
            compress_ratio_csa=csa, compress_ratio_hca=hca,
            hc_mult=int(cfg.get("hc_mult", 4)), hc_sinkhorn_iters=int(cfg.get("hc_sinkhorn_iters", 20)),
            hc_eps=float(cfg.get("hc_eps", 1e-6)), swiglu_limit=float(cfg.get("swiglu_limit", 10.0)),
            sliding_window=int(cfg.get("sliding_window", 128)), o_groups=int(cfg.get("o_groups", 8)),
            o_lora_rank=int(cfg.get("o_lora_rank", 1024)), index_n_heads=int(cfg.get("index_n_heads", 64)),
            index_head_dim=int(cfg.get("index_head_dim", 128)), index_topk=int(cfg.get("index_topk", 512)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 1048576)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", 0), eos_token_id=cfg.get("eos_token_id", 1),
            expert_dtype=cfg.get("expert_dtype"), quantization=quant,
        )


def _rope_specs(cfg: dict, head_dim: int) -> tuple[RopeSpec, RopeSpec]:
    """(main, compress) rope settings. Sliding layers use ``main`` (plain rope, theta=rope_theta);
    compressed layers, their compressors and the indexer use ``compress`` (compress_rope_theta, YaRN)."""
    rp = cfg.get("rope_parameters") or {}
    max_pos = int(cfg.get("max_position_embeddings", 1048576))
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        return (RopeSpec.from_dict(rp["main"], head_dim, max_pos, yarn_attention_default=None),
                RopeSpec.from_dict(rp["compress"], head_dim, max_pos, yarn_attention_default=None))
    if "partial_rotary_factor" in cfg and cfg["partial_rotary_factor"] is not None:
        prf = float(cfg["partial_rotary_factor"])
    elif "qk_rope_head_dim" in cfg:
        prf = int(cfg["qk_rope_head_dim"]) / head_dim
    else:
        prf = 64 / 512
    scaling = {k: v for k, v in {**(cfg.get("rope_scaling") or {}), **rp}.items() if k not in ("main", "compress")}
    main = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0), "partial_rotary_factor": prf}
    compress = {**scaling, "rope_theta": cfg.get("compress_rope_theta", 160000.0), "partial_rotary_factor": prf}
    # The release scales neither cos nor sin by YaRN's mscale: attention_factor defaults to 1 here.
    return (RopeSpec.from_dict(main, head_dim, max_pos, yarn_attention_default=1.0),
            RopeSpec.from_dict(compress, head_dim, max_pos, yarn_attention_default=1.0))
