"""Architecture name (config.json "architectures"[0]) -> model class."""
from __future__ import annotations

from tierserve.models.llama import LlamaForCausalLM

_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(architecture: str):
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r} in config.json; supported: "
                         f"{', '.join(supported_architectures())}") from None
