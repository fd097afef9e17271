"""Tiny random DeepSeek-V4 checkpoints built with transformers' own classes and ``save_pretrained``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

BASE = dict(
    vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
    q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=4, o_groups=2, o_lora_rank=16,
    index_n_heads=16, index_head_dim=16, partial_rotary_factor=0.25, max_position_embeddings=256,
    bos_token_id=0, eos_token_id=1, pad_token_id=None,
)

# Every layer type, hash and top-k MoE, hc_mult > 1, window (8) shorter than the prompts, small
# compress ratios (CSA 4, HCA 8), an indexer top-k (3) smaller than the number of entries, YaRN.
CONFIGS = {
    "mixed": dict(
        num_hidden_layers=4, layer_types=[SLIDING, CSA, HCA, CSA], mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={CSA: 4, HCA: 8}, hc_mult=2, sliding_window=8, index_topk=3,
        rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                             beta_fast=32, beta_slow=1)),
    # HCA first, two hash layers, hc_mult 3, sigmoid scoring, plain rope, a top-k that usually keeps all.
    "hca-first": dict(
        num_hidden_layers=3, layer_types=[HCA, SLIDING, CSA], mlp_layer_types=["hash_moe", "hash_moe", "moe"],
        compress_rates={CSA: 4, HCA: 16}, hc_mult=3, sliding_window=12, index_topk=6, scoring_func="sigmoid",
        routed_scaling_factor=2.5, swiglu_limit=0.5),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: thread hand-offs cost more than they give (import this into a test module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_config(name: str = "mixed", **overrides):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(**{**BASE, **CONFIGS[name], **overrides})


def make_checkpoint(path: Path, name: str = "mixed", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised ``DeepseekV4ForCausalLM`` (weights large enough that logits are
    not near-ties, random sinks / position biases / mHC biases / router biases, a random hash table)."""
    from transformers import DeepseekV4ForCausalLM

    cfg = hf_config(name, **overrides)
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
            elif "norm" in n or n.endswith("scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.8)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for n, b in model.named_buffers():
            if n.endswith("tid2eid"):
                rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                        for _ in range(b.shape[0])]
                b.copy_(torch.stack(rows))
            elif n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    path = Path(path)
    model.save_pretrained(path)
    return path


# Which checkpoint weights the release ships quantised: FP4 routed experts, FP8 attention / shared
# expert projections; the compressor, indexer-compressor, weights_proj, router, embeddings, head and
# all norms / biases stay in high precision.
FP8_PATTERN = r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123])\.weight$"
FP4_PATTERN = r"\.ffn\.experts\.\d+\.w[123]\.weight$"


def quantize_checkpoint(src: Path, dst: Path, block=(128, 128), fp8_scale_suffix: str = ".weight_scale_inv",
                        shards: int = 2) -> Path:
    """Rewrite a checkpoint with FP8 e4m3 (block scales, fp32 under ``weight_scale_inv`` or UE8M0
    under ``.scale``) and FP4 e2m1 experts (1 x 32 UE8M0 ``.scale``), sharded with an index file,
    plus an ``mtp.*`` tensor the loader must skip."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    from tierserve.models.deepseek_v4.quant import quantize_fp4, quantize_fp8

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for k, t in tensors.items():
        base = k[: -len(".weight")]
        if re.search(FP4_PATTERN, k):
            out[k], out[base + ".scale"] = quantize_fp4(t)
        elif re.search(FP8_PATTERN, k):
            q, s = quantize_fp8(t, block, ue8m0=fp8_scale_suffix == ".scale")
            out[k] = q
            out[base + fp8_scale_suffix] = s.to(torch.float8_e8m0fnu) if fp8_scale_suffix == ".scale" else s
        else:
            out[k] = t
    out["mtp.0.emb.weight"] = torch.zeros(2, 2)
    keys = sorted(out)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: out[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(dst / name))
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block),
                                  "scale_fmt": "ue8m0" if fp8_scale_suffix == ".scale" else "float32"}
    cfg["expert_dtype"] = "fp4"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def engine_checkpoints(tmp_path_factory, names=None) -> dict[str, Path]:
    """name -> a tiny checkpoint dir with a synthetic 128-token tokenizer, ready for ``LLM``."""
    from tierserve.loader.tokenizer import Tokenizer

    out = {}
    for name in names or CONFIGS:
        path = make_checkpoint(tmp_path_factory.mktemp(name), name)
        Tokenizer.synthetic(128).backend.save(str(path / "tokenizer.json"))
        out[name] = path
    return out


def tiny_models(tmp_path_factory) -> dict:
    """name -> a loaded tiny model for every config, plus "hca128" (the mixed config with HCA ratio 128)."""
    from tierserve.models.deepseek_v4 import load_model

    out = {name: load_model(make_checkpoint(tmp_path_factory.mktemp(name), name)) for name in CONFIGS}
    out["hca128"] = load_model(make_checkpoint(tmp_path_factory.mktemp("hca128"), "mixed",
                                               compress_rates={CSA: 4, HCA: 128}))
    return out


def rand_ids(n: int, seed: int) -> list[int]:
    """``n`` random token ids in [2, 128) from ``seed``."""
    return torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
