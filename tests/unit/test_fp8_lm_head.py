"""``fp8_lm_head`` (with ``quantization="fp8"``): the output projection in block-scaled FP8, untied heads replaced,
tied embeddings given an FP8 copy; logits equal the FP8 reference and differ from the bf16/fp32 head."""
import pytest
import torch

from tierserve.config import EngineConfig
from tierserve.quant.fp8 import fp8_linear_ref, quantize_fp8_blockwise


def test_needs_fp8_quantization():
    with pytest.raises(ValueError, match="quantization='fp8'"):
        EngineConfig(fp8_lm_head=True)
    with pytest.raises(ValueError, match="True or False"):
        EngineConfig(quantization="fp8", fp8_lm_head="yes")


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_logits_from_the_fp8_head(tmp_path, family):
    from tests.helpers.tiny_models import make_checkpoint
    from tierserve import LLM, SamplingParams
    from tierserve.quant.fp8_linear import Fp8Linear

    ckpt = make_checkpoint(tmp_path / family, family)
    base = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=64, quantization="fp8").engine.runner.model
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=64, quantization="fp8", fp8_lm_head=True)
    model = llm.engine.runner.model
    tied = family == "llama-tied"
    head = model.lm_head_fp8 if tied else model.lm_head
    assert isinstance(head, Fp8Linear) and (model.lm_head is None) == tied
    w = model.embed_tokens.weight if tied else base.lm_head.weight
    h = torch.randn(3, w.shape[1])
    want = fp8_linear_ref(h, *quantize_fp8_blockwise(w))
    got = model.compute_logits(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base.compute_logits(h)).abs().max() > 1e-4         # really FP8, not the full-precision head
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
