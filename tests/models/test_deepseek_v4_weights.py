"""DeepSeek-V4 loading: public key names, FP8 (128x128 block scales) and FP4 (1x32 UE8M0) weights
dequantised on load, config parsing / validation, rope, and KV bytes per token."""
import json

import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import (  # noqa: F401
    FP4_PATTERN,
    FP8_PATTERN,
    hf_config,
    make_checkpoint,
    one_thread,
    quantize_checkpoint,
)
from tierserve.models.deepseek_v4 import DeepseekV4Config, load_model
from tierserve.models.deepseek_v4.kv_bytes import dense_kv_bytes_per_token, entry_bytes, state_bytes
from tierserve.models.deepseek_v4.quant import dequantize_fp4, quantize_fp4, quantize_fp8, unpack_fp4
from tierserve.models.deepseek_v4.weights import module_name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("v4"), "mixed")


# ---------------------------------------------------------------- independent reference decoders
def ref_e2m1(nibble: int) -> float:
    sign = -1.0 if nibble & 8 else 1.0
    exp, man = (nibble >> 1) & 3, nibble & 1
    return sign * (man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2))


def ref_dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([ref_e2m1(n) for n in range(16)])
    u8 = packed.view(torch.uint8).long()
    R, C = u8.shape
    out = torch.empty(R, 2 * C)
    out[:, 0::2], out[:, 1::2] = table[u8 & 0xF], table[u8 >> 4]     # even column in the low nibble
    return out * scale.float().repeat_interleave(32, dim=1)


def ref_dequant_fp8(q: torch.Tensor, s: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    out = q.float().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] *= s[i, j].float()
    return out


def test_fp4_codes_and_packing():
    vals = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4 + [-0.5, -1.0, -6.0, 0.0] * 8])
    packed, scale = quantize_fp4(vals)
    assert packed.dtype == torch.int8 and packed.shape == (1, 32) and scale.dtype == torch.float8_e8m0fnu
    assert scale.float().tolist() == [[1.0, 1.0]]
    assert torch.equal(dequantize_fp4(packed, scale), vals)
    assert int(packed.view(torch.uint8)[0, 0]) == 0x10     # element 0 (0.0) low nibble, element 1 (0.5) high
    assert torch.equal(unpack_fp4(torch.tensor([[0xF9]], dtype=torch.uint8)), torch.tensor([[-0.5, -6.0]]))


def test_fp8_blocks_with_partial_edges():
    w = torch.randn(200, 130) * torch.logspace(-3, 1, 130)
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
    from tierserve.models.deepseek_v4.quant import dequantize_fp8

    d = dequantize_fp8(q, s)
    assert torch.equal(d, ref_dequant_fp8(q, s, 128, 128))
    assert ((d - w).abs() <= w.abs() * 2 ** -4 + s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
            * 2 ** -9).all()


@pytest.mark.parametrize("block,suffix", [((128, 128), ".weight_scale_inv"), ((16, 24), ".scale")])
def test_quantised_checkpoint_dequantises_exactly(tiny, tmp_path, block, suffix):
    import re

    from safetensors import safe_open

    qdir = quantize_checkpoint(tiny, tmp_path / "q", block=block, fp8_scale_suffix=suffix)
    qmodel = load_model(qdir)
    # expected: the fp32 model with every quantised weight replaced by an independent dequantisation
    expected = load_model(tiny)
    params = dict(expected.named_parameters())
    n_fp8 = n_fp4 = 0
    index = json.loads((qdir / "model.safetensors.index.json").read_text())["weight_map"]

    def get(k):
        with safe_open(str(qdir / index[k]), framework="pt") as f:
            return f.get_tensor(k)

    for key in index:
        if re.search(FP4_PATTERN, key):
            params[module_name(key)].data = ref_dequant_fp4(get(key), get(key[:-7] + ".scale"))
            n_fp4 += 1
        elif re.search(FP8_PATTERN, key):
            params[module_name(key)].data = ref_dequant_fp8(get(key), get(key[:-7] + suffix), *block)
            n_fp8 += 1
    assert n_fp4 == 3 * 4 * 4 and n_fp8 == 4 * 8 + 2 * 1
    got_sd, want_sd = qmodel.state_dict(), expected.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for name, p in got_sd.items():
        assert torch.equal(p, want_sd[name]), name
    ids = torch.randint(2, 128, (23,), generator=torch.Generator().manual_seed(0))
    q_logits = qmodel.forward_full(ids)
    assert torch.equal(q_logits, expected.forward_full(ids))
    # and the quantised weights are close to the originals (FP4 of random weights is coarse)
    original = load_model(tiny).state_dict()
    for key in index:
        name = module_name(key)
        if name is None or not re.search(FP4_PATTERN + "|" + FP8_PATTERN, key):
            continue
        w, d = original[name], got_sd[name]
        bound = 0.2 if re.search(FP4_PATTERN, key) else 0.04
        assert (d - w).norm() / w.norm() < bound, key


def test_key_names():
    assert module_name("model.layers.3.attn.wq_a.weight") == "layers.3.attn.wq_a.weight"
    assert module_name("layers.3.attn.indexer.compressor.ape") == "layers.3.attn.indexer.compressor.ape"
    assert module_name("embed.weight") == module_name("model.embed_tokens.weight") == "embed.weight"
    assert module_name("head.weight") == module_name("lm_head.weight") == "head.weight"
    assert module_name("hc_head_fn") == module_name("model.hc_head.hc_fn") == "hc_head.fn"
    assert module_name("model.layers.0.hc_ffn_scale") == "layers.0.hc_ffn.scale"
    assert module_name("mtp.0.hc_head_fn") is None


def test_missing_key_is_reported(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    t = load_file(str(tiny / "model.safetensors"))
    del t["model.layers.1.attn.indexer.wq_b.weight"]
    (tmp_path / "config.json").write_text((tiny / "config.json").read_text())
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.attn.indexer.wq_b.weight"):
        load_model(tmp_path)


# ---------------------------------------------------------------- config and rope
def test_release_config_layout_parses_like_transformers():
    """The release's config.json (compress_ratios, num_hash_layers, qk_rope_head_dim, rope_scaling)
    gives the same model as the layout transformers writes."""
    from transformers import DeepseekV4Config as HFConfig

    legacy = dict(vocab_size=128, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, head_dim=32,
                  q_lora_rank=32, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                  o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, compress_ratios=[0, 0, 4, 128, 4],
                  num_hash_layers=2, qk_rope_head_dim=8, compress_rope_theta=160000.0,
                  rope_scaling=dict(type="yarn", factor=16, original_max_position_embeddings=64,
                                    beta_fast=32, beta_slow=1))
    ours = DeepseekV4Config.from_hf(dict(legacy))
    via_hf = DeepseekV4Config.from_hf(HFConfig(**legacy).to_dict())
    assert ours == via_hf
    assert ours.layer_types[:3] == ("sliding_attention", "sliding_attention", "compressed_sparse_attention")
    assert ours.mlp_layer_types == ("hash_moe", "hash_moe", "moe", "moe", "moe")
    assert ours.rope_compress.rope_type == "yarn" and ours.rope_compress.attention_factor == 1.0
    assert ours.rope_main.rope_type == "default" and ours.rope_head_dim == 8


def test_rope_tables_match_transformers():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    hf = hf_config("mixed")
    ours = DeepseekV4Config.from_hf(hf.to_dict())
    rot = DeepseekV4RotaryEmbedding(hf)
    for label, spec in (("main", ours.rope_main), ("compress", ours.rope_compress)):
        torch.testing.assert_close(spec.inv_freq(), getattr(rot, f"{label}_inv_freq"), atol=0, rtol=0)
        assert spec.attention_factor == getattr(rot, f"{label}_attention_scaling")


@pytest.mark.parametrize("field,value,match", [
    ("o_groups", 3, "o_groups"),
    ("num_key_value_heads", 2, "num_key_value_heads"),
    ("layer_types", ["sliding_attention", "bogus", "sliding_attention", "sliding_attention"], "layer_types"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("scoring_func", "relu", "scoring_func"),
    ("sliding_window", 0, "sliding_window"),
])
def test_config_validation_names_the_field(field, value, match):
    d = hf_config("mixed").to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=match):
        DeepseekV4Config.from_hf(d)


# ---------------------------------------------------------------- KV bytes
def test_kv_bytes_per_token():
    from transformers import DeepseekV4Config as HFConfig

    assert entry_bytes(512, 64, "model1") == 584 and entry_bytes(512, 64, "bf16") == 1024
    cfg = DeepseekV4Config.from_hf(HFConfig().to_dict())      # 43 layers: 20 CSA + 23 HCA, W = 128
    assert cfg.layer_types.count("compressed_sparse_attention") == 20
    bf16, model1 = state_bytes(cfg, "bf16"), state_bytes(cfg, "model1")
    assert bf16.per_token == 20 * (1024 + 256) / 4 + 23 * 1024 / 128            # 6584
    assert model1.per_token == 20 * (584 + 132) / 4 + 23 * 584 / 128           # 3684.94
    assert bf16.window == 43 * 128 * 1024 and model1.window == 43 * 128 * 584
    llama = dense_kv_bytes_per_token(32, 8, 128)
    assert llama == 131072 and llama / model1.per_token > 35
