"""Architecture name (config.json "architectures"[0]) -> model class and engine-facing config.

Two kinds of models:

* paged (Llama family): ``ModelConfig`` + ``ModelRunner`` (paged KV pool, CUDA graphs, tiers ...);
* stateful (DeepSeek-V4): the model keeps an explicit per-request state object instead of paged KV;
  ``StateModelConfig`` + ``tierserve.runner.stateful_runner.StatefulRunner``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tierserve.models.config import ModelConfig
from tierserve.models.llama import LlamaForCausalLM

_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}

# Models with an explicit per-request state (served by StatefulRunner, no paged KV yet).
_STATEFUL = ("DeepseekV4ForCausalLM",)


def supported_architectures() -> list[str]:
    return sorted([*_REGISTRY, *_STATEFUL])


def is_stateful(architecture: str) -> bool:
    return architecture in _STATEFUL


def get_model_class(architecture: str):
    if architecture == "DeepseekV4ForCausalLM":
        from tierserve.models.deepseek_v4 import DeepseekV4Model
        return DeepseekV4Model
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r} in config.json; supported: "
                         f"{', '.join(supported_architectures())}") from None


@dataclass
class StateModelConfig:
    """What the engine reads of a stateful model's config (the fields it shares with ``ModelConfig``),
    plus the model's own parsed config in ``model``."""
    architecture: str
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    num_layers: int
    model: Any                          # e.g. deepseek_v4.DeepseekV4Config
    torch_dtype: str = "float32"
    engram: Any = None                  # no Engram for these models


def model_config(hf_cfg: dict) -> ModelConfig | StateModelConfig:
    """Parse config.json for the engine; raises ``ValueError`` for an unknown architecture or a bad field."""
    arch = (hf_cfg.get("architectures") or ["?"])[0]
    if arch == "DeepseekV4ForCausalLM":
        from tierserve.models.deepseek_v4.config import DeepseekV4Config

        cfg = DeepseekV4Config.from_hf(hf_cfg)
        dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "bfloat16"
        return StateModelConfig(arch, cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size,
                                cfg.num_hidden_layers, cfg, torch_dtype=str(dtype).replace("torch.", ""))
    get_model_class(arch)                  # unknown architecture -> ValueError before parsing its fields
    return ModelConfig.from_hf(hf_cfg)
