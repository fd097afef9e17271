"""Tiny random HF checkpoints (transformers save_pretrained + a test tokenizer) for model tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers.tiny_tokenizer import make_tokenizer_dir

VOCAB = 512

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=2)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=24)),
}


def make_checkpoint(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():   # larger-than-default weights so logits are not all near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    path = Path(path)
    model.save_pretrained(path)
    make_tokenizer_dir(path, vocab_size=VOCAB)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}))
    return path
