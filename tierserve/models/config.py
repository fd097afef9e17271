"""ModelConfig: the fields of a HF config.json that the Llama-family model code needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tierserve.models.layers.rotary import RopeConfig


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    engram: Any = None                  # memory.engram_config.EngramConfig when the checkpoint has Engram

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        arch = (cfg.get("architectures") or ["?"])[0]
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            act = cfg.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise ValueError(f"config.json: hidden_act {act!r} is not supported (only silu)")
            window = None
            if arch == "MistralForCausalLM":
                window = cfg.get("sliding_window")
            elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and cfg.get("use_sliding_window"):
                window = cfg.get("sliding_window")
            dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
            engram = None
            if cfg.get("engram"):
                from tierserve.memory.engram_config import EngramConfig
                engram = EngramConfig.from_dict(cfg["engram"])
                engram.check_model(int(cfg["num_hidden_layers"]))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rope=RopeConfig.from_hf(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                qk_norm=arch == "Qwen3ForCausalLM",
                sliding_window=int(window) if window else None,
                torch_dtype=str(dtype).replace("torch.", ""),
                engram=engram,
            )
        except KeyError as e:
            raise ValueError(f"config.json for {arch} is missing the field {e.args[0]!r}") from None

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * h * i + 2 * h + (2 * d if self.qk_norm else 0)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h
