"""Fp8Linear (CPU path), model quantisation in the engine, and the FP8-checkpoint loading helpers."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tierserve.quant import (
    FP8_DTYPE,
    Fp8Linear,
    dequantize_fp8_blockwise,
    fp8_row_block,
    load_fp8_weight,
    pair_fp8_weights,
    quantize_fp8_blockwise,
    quantize_linear,
    quantize_model_fp8,
)


@pytest.mark.parametrize("n,k,bias", [(160, 96, True), (256, 384, False), (70, 129, True)])
def test_fp8_linear_matches_linear_on_dequantised_weight(n, k, bias):
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=bias)
    q = quantize_linear(lin)
    assert q.qweight.dtype == FP8_DTYPE and q.scale_inv.shape == (-(-n // 128), -(-k // 128))
    for shape in [(1, k), (5, k), (2, 3, k)]:
        x = torch.randn(shape)
        want = F.linear(x, q.dequantize(), lin.bias)
        assert torch.equal(q(x), want)                      # exact: the CPU path is dequantise + F.linear
        assert (q(x) - lin(x)).abs().max() < 0.05 * lin(x).abs().max()
    xb = torch.randn(4, k, dtype=torch.bfloat16)
    assert q(xb).dtype == torch.bfloat16
    assert torch.equal(q(xb), F.linear(xb, q.dequantize(torch.bfloat16), lin.bias.bfloat16() if bias else None))


def test_dtype_casts_keep_fp8_storage():
    q = quantize_linear(nn.Linear(200, 130, bias=True))
    codes, scales = q.qweight.clone(), q.scale_inv.clone()
    q.to(torch.bfloat16)
    assert q.qweight.dtype == FP8_DTYPE and q.scale_inv.dtype == torch.float32
    assert torch.equal(q.qweight.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(q.scale_inv, scales)
    assert q.bias.dtype == torch.bfloat16
    q.half().float()
    assert q.qweight.dtype == FP8_DTYPE and torch.equal(q.scale_inv, scales)
    with torch.device("meta"):
        m = Fp8Linear(64, 32)
    m = m.to_empty(device="cpu")
    assert m.qweight.dtype == FP8_DTYPE and m.qweight.device.type == "cpu"
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scale_inv", "bias"}


def test_quantize_model_replaces_linears_and_skips():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.block = nn.Sequential(nn.Linear(16, 40), nn.SiLU(), nn.Linear(40, 16))
            self.lm_head = nn.Linear(16, 10, bias=False)

    m = quantize_model_fp8(Tiny())
    assert isinstance(m.block[0], Fp8Linear) and isinstance(m.block[2], Fp8Linear)
    assert type(m.lm_head) is nn.Linear and type(m.embed) is nn.Embedding
    assert not any(type(x) is nn.Linear for n, x in m.named_modules() if "lm_head" not in n)


def test_prefill_mode_is_validated():
    with pytest.raises(ValueError, match="prefill"):
        Fp8Linear(8, 8, prefill="fast")


# ---- checkpoint loading -------------------------------------------------------------------------------
def _ckpt_shard(rows, k, seed):
    torch.manual_seed(seed)
    w = torch.randn(rows, k)
    q, s = quantize_fp8_blockwise(w)
    return w, q, s


@pytest.mark.parametrize("rows", [[256, 128, 128], [128, 200], [96, 32, 32], [704, 704]])
def test_fused_shards_load_exactly(rows):
    """q/k/v (or gate/up) shards quantised separately, as a checkpoint ships them, loaded into one fused
    layer: aligned offsets keep 128-row scales, unaligned ones get per-row scales; both are exact."""
    k = 200
    shards = [_ckpt_shard(r, k, i) for i, r in enumerate(rows)]
    bn = fp8_row_block(rows)
    assert bn == (128 if all(sum(rows[:i]) % 128 == 0 for i in range(len(rows))) else 1)
    layer = Fp8Linear(k, sum(rows), block_size=(bn, 128))
    off = 0
    for name, (_, q, s) in zip("abc", shards):
        qq, ss = load_fp8_weight(f"layers.0.{name}_proj.weight", q.view(torch.uint8), s)
        layer.load_shard(qq, ss, off)
        off += q.shape[0]
    want = torch.cat([dequantize_fp8_blockwise(q, s) for _, q, s in shards])
    assert torch.equal(layer.dequantize(), want)
    x = torch.randn(3, k)
    assert torch.equal(layer(x), F.linear(x, want))


def test_unaligned_shard_into_128_row_layer_is_an_error():
    _, q, s = _ckpt_shard(64, 128, 0)
    layer = Fp8Linear(128, 192)
    with pytest.raises(ValueError, match="not aligned"):
        layer.load_shard(q, s, 0)        # its partial last block would share scales with the next shard
    with pytest.raises(ValueError, match="not aligned"):
        layer.load_shard(q, s, 64)
    _, q2, s2 = _ckpt_shard(128, 128, 1)
    layer.load_shard(q2, s2, 0)
    layer.load_shard(q, s, 128)          # the last shard may end in a partial block
    with pytest.raises(ValueError, match="does not fit"):
        layer.load_shard(q, s, 160)


def test_load_fp8_weight_validates():
    _, q, s = _ckpt_shard(130, 260, 0)
    with pytest.raises(ValueError, match=r"model.x.weight_scale_inv: shape \(1, 3\)"):
        load_fp8_weight("model.x.weight", q, s[:1])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        load_fp8_weight("model.x.weight", q.float(), s)
    with pytest.raises(ValueError, match="2-D"):
        load_fp8_weight("model.x.weight", q[0], s)
    # power-of-two scales may be stored as UE8M0 bytes (float8_e8m0fnu): read as fp32 exactly
    q2, s2 = quantize_fp8_blockwise(torch.randn(130, 260), pow2_scale=True)
    _, got = load_fp8_weight("model.x.weight", q2, s2.to(torch.float8_e8m0fnu))
    assert got.dtype == torch.float32 and torch.equal(got, s2)
    raw = (torch.log2(s2) + 127).to(torch.uint8)           # raw UE8M0 exponent bytes
    assert torch.equal(load_fp8_weight("model.x.weight", q2, raw)[1], s2)


def test_pair_fp8_weights_in_any_order():
    _, q, s = _ckpt_shard(8, 8, 0)
    norm = torch.ones(8)
    stream = [("a.weight_scale_inv", s), ("n.weight", norm), ("a.weight", q), ("b.weight", q),
              ("b.weight_scale_inv", s)]
    out = list(pair_fp8_weights(stream))
    assert [(n, sc is not None) for n, _, sc in out] == [("n.weight", False), ("a.weight", True), ("b.weight", True)]
    with pytest.raises(ValueError, match="1 weight"):
        list(pair_fp8_weights([("c.weight", q)]))
    with pytest.raises(ValueError, match="1 weight_scale_inv"):
        list(pair_fp8_weights([("c.weight_scale_inv", s)]))
    # DeepSeek-V4 release naming (X.scale); a lone non-FP8 ".scale" tensor passes through
    out = list(pair_fp8_weights([("e.scale", s), ("e.weight", q), ("gate.scale", norm)]))
    assert [(n, sc is not None) for n, _, sc in out] == [("e.weight", True), ("gate.scale", False)]


# ---- the engine ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory):
    from tests.helpers.tiny_models import make_checkpoint
    # hidden 96 / head_dim 24: qkv has 192 rows, gate_up 400, down_proj K=200: partial 128-blocks everywhere
    return make_checkpoint(tmp_path_factory.mktemp("fp8") / "llama", "llama", hidden_size=96,
                           intermediate_size=200)


def _run(llm, prompts):
    from tierserve import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    return llm.generate(prompts, sp)


def _prompt_lps(outs, prompts):
    return [o.prompt_logprobs[i][p[i]] for o, p in zip(outs, prompts) for i in range(1, len(p))]


def test_engine_fp8_equals_dequantised_model_and_reports_delta(odd_ckpt):
    from tierserve import LLM

    rng = random.Random(0)
    prompts = [[0] + [rng.randrange(3, 500) for _ in range(40)] for _ in range(3)]
    make = lambda: LLM(str(odd_ckpt), dtype="float32", device="cpu", max_model_len=128)
    base = _run(make(), prompts)

    llm = make()
    model = quantize_model_fp8(llm.engine.runner.model)
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 2 * 2 and model.layers[0].self_attn.qkv_proj.out_features == 192
    fp8 = _run(llm, prompts)
    assert all(len(o.outputs[0].token_ids) == 8 for o in fp8)

    # same engine with plain Linear layers holding the dequantised weights: identical logprobs
    ref_llm = make()
    for name, m in ref_llm.engine.runner.model.named_modules():
        if type(m) is nn.Linear and "lm_head" not in name:
            m.weight.data.copy_(model.get_submodule(name).dequantize())
    ref = _run(ref_llm, prompts)
    assert [o.outputs[0].token_ids for o in ref] == [o.outputs[0].token_ids for o in fp8]
    torch.testing.assert_close(_prompt_lps(fp8, prompts), _prompt_lps(ref, prompts), rtol=0, atol=1e-5)

    # quality delta vs the unquantised model (random weights: many near-ties, so compare logprobs)
    d = [abs(a - b) for a, b in zip(_prompt_lps(fp8, prompts), _prompt_lps(base, prompts))]
    mean_d = sum(d) / len(d)
    print(f"tiny random llama, fp8 weights: mean |dlogprob| {mean_d:.4f}, max {max(d):.4f}")
    assert mean_d < 0.15 and max(d) < 1.0         # measured: mean 0.049, max 0.149 nats


def test_tierserve_nano_fp8_perplexity_delta():
    from tierserve import LLM

    text = ("import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Entry point.\"\"\"\n"
            "    if argv is None:\n        argv = sys.argv[1:]\n    for name in argv:\n"
            "        if os.path.isdir(name):\n            print(name)\n    return 0\n\n\n"
            "class Reader:\n    def __init__(self, path):\n        self.path = path\n\n"
            "    def read(self):\n        with open(self.path) as f:\n            return f.read()\n")
    llm = LLM(None, dtype="float32", device="cpu", max_model_len=512)
    ids = llm.get_tokenizer().encode(text)
    base = _prompt_lps(_run(llm, [ids]), [ids])
    quantize_model_fp8(llm.engine.runner.model)
    fp8 = _prompt_lps(_run(llm, [ids]), [ids])
    ppl_b, ppl_q = (math.exp(-sum(v) / len(v)) for v in (base, fp8))
    print(f"tierserve-nano, {len(base)} tokens: ppl {ppl_b:.4f} -> {ppl_q:.4f} ({100 * (ppl_q / ppl_b - 1):+.2f}%)")
    assert abs(ppl_q / ppl_b - 1) < 0.02


def test_engine_quantization_setting(tmp_path):
    from tests.helpers.tiny_models import make_checkpoint
    from tierserve import LLM, SamplingParams
    from tierserve.quant.fp8_linear import Fp8Linear

    path = make_checkpoint(tmp_path / "m", "llama")
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=128, quantization="fp8")
    model = llm.engine.runner.model
    assert isinstance(model.layers[0].self_attn.qkv_proj, Fp8Linear)
    assert isinstance(model.layers[0].mlp.down_proj, Fp8Linear)
    out = llm.generate([[0, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 8
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(path), quantization="int3")
