"""Block-scaled FP8 checkpoints (``*.weight`` e4m3 + ``*.weight_scale_inv``, quantization_config fp8) load into
Fp8Linear layers as stored, and give exactly the outputs of the same model with the dequantised weights."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.quant.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from tierserve.quant.fp8_linear import Fp8Linear

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fp8_pair(tmp_path, family):
    src = make_checkpoint(tmp_path / "src", family)
    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    shutil.copytree(src, fp8_dir)
    shutil.copytree(src, ref_dir)
    files = sorted(src.glob("*.safetensors"))
    for f in files:
        state = load_file(str(f))
        fp8, ref = {}, {}
        for name, w in state.items():
            if name.endswith(".weight") and any(f".{p}." in name for p in PROJ):
                q, s = quantize_fp8_blockwise(w.float(), (128, 128))
                fp8[name], fp8[name + "_scale_inv"] = q, s
                ref[name] = dequantize_fp8_blockwise(q, s, (128, 128)).to(w.dtype)
            else:
                fp8[name] = ref[name] = w
        save_file(fp8, str(fp8_dir / f.name))
        save_file(ref, str(ref_dir / f.name))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return fp8_dir, ref_dir


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp8_checkpoint_equals_dequantised_model(tmp_path, family):
    fp8_dir, ref_dir = _fp8_pair(tmp_path, family)
    prompts = [[0, 5, 9, 200, 31], [0] + list(range(40, 75))]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    got_llm = LLM(str(fp8_dir), dtype="float32", device="cpu", max_model_len=128)
    layer = got_llm.engine.runner.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
    # q/k/v shards start at rows 0, 64, 96: not 128-aligned -> per-row scales; gate/up at 0, 128 -> blocks
    assert layer.self_attn.qkv_proj.block_size == (1, 128) and layer.mlp.gate_up_proj.block_size == (128, 128)
    got = got_llm.generate(prompts, sp)
    want = LLM(str(ref_dir), dtype="float32", device="cpu", max_model_len=128).generate(prompts, sp)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in lb.items():
                assert abs(la[tok] - lp) < 1e-5


def test_fp8_weight_without_scale_is_an_error(tmp_path):
    fp8_dir, _ = _fp8_pair(tmp_path, "llama")
    f = sorted(fp8_dir.glob("*.safetensors"))[0]
    state = load_file(str(f))
    del state["model.layers.0.mlp.down_proj.weight_scale_inv"]
    save_file(state, str(f))
    with pytest.raises(ValueError, match="without a scale"):
        LLM(str(fp8_dir), dtype="float32", device="cpu", max_model_len=128)
