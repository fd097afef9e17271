"""The q/k/v split-K sum + rotary + KV write kernel (models/layers/triton_qkv_rope.py) against the chain it replaces
(``fp8_gemv_rows`` then ``rope_write_kv``): the same bits, random inputs. On the GPU when there is one, else under
TRITON_INTERPRET=1 at tiny sizes; the engine test (FP8 weights, greedy, with and without the fold) needs CUDA."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tests.helpers.tiny_models import make_checkpoint  # noqa: E402
from tierserve.models.layers import triton_fused as fused  # noqa: E402
from tierserve.models.layers import triton_qkv_rope  # noqa: E402
from tierserve.models.layers.rotary import RopeConfig, RotaryEmbedding  # noqa: E402
from tierserve.quant.fp8 import quantize_fp8_blockwise  # noqa: E402
from tierserve.quant.triton_fp8_gemv_rows import fp8_gemv_rows  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [None, 4, 5])         # no KV write; pages without / with a summary row
def test_fused_reduce_rope_kv_equals_the_chain(bias, rows):
    torch.manual_seed(7)
    hq, hkv, D, K, page, N = 4, 2, 32, 512, 4, 6
    n = (hq + 2 * hkv) * D
    w, s = quantize_fp8_blockwise(torch.randn(n, K, device=DEV) * 0.05, (128, 128))
    x = torch.randn(1, K, device=DEV).to(torch.bfloat16)
    b = torch.randn(n, device=DEV).to(torch.bfloat16) if bias else None
    rope = RotaryEmbedding(D, 64, RopeConfig(theta=10000.0))
    rope.build(DEV)
    pos, pages, offs = (torch.tensor([v], device=DEV) for v in (41, 3, 1))
    kv_ref = torch.randn(N, 2, rows, hkv, D, device=DEV).to(torch.bfloat16) if rows else None
    kv_got = kv_ref.clone() if rows else None

    qkv = fp8_gemv_rows(x, w, s, b)
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    fused.rope_write_kv(q.view(1, hq, D), k.view(1, hkv, D), v.view(1, hkv, D), rope.cos, rope.sin, pos, kv_ref,
                        pages, offs, page)

    part = fp8_gemv_rows(x, w, s, partials_only=True)
    assert part is not None and part.shape[0] > 1 and part.dtype == torch.float32
    out = torch.empty(1, n, dtype=torch.bfloat16, device=DEV)
    triton_qkv_rope.reduce_rope_write_kv(part, b, out, hq, hkv, rope.cos, rope.sin, pos, kv_got, pages, offs, page)
    assert torch.equal(out, qkv)
    if rows:
        assert torch.equal(kv_got, kv_ref)


def test_partials_only_is_none_for_one_split():
    w, s = quantize_fp8_blockwise(torch.randn(256, 128, device=DEV), (128, 128))
    assert fp8_gemv_rows(torch.randn(1, 128, device=DEV), w, s, partials_only=True) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fold runs in the CUDA engine")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_fp8_decode_with_the_fold_is_bit_identical(tmp_path, monkeypatch, family):
    """FP8 weights, batch 1, CUDA graphs and multi-step windows: greedy tokens and logprobs with the fold equal those
    without it (TIERSERVE_QKV_ROPE_FOLD=0), and the fold really runs."""
    from tierserve import LLM, SamplingParams
    from tierserve.models import llama

    # q/k/v 1024 x 512: four splits (the rotary fold)
    path = make_checkpoint(tmp_path / "m", family, hidden_size=512, intermediate_size=8704)
    prompt = [0] + [(7 * i + 3) % 500 + 3 for i in range(200)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    calls, real = [], triton_qkv_rope.reduce_rope_write_kv
    monkeypatch.setattr(triton_qkv_rope, "reduce_rope_write_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for fold in (False, True):
        monkeypatch.setattr(llama, "QKV_ROPE_FOLD", fold)
        for k in (1, 4):
            llm = LLM(str(path), dtype="bfloat16", device="cuda", quantization="fp8", max_model_len=512,
                      max_num_seqs=1, num_scheduler_steps=k, enable_prefix_caching=False)
            o = llm.generate([prompt], sp)[0].outputs[0]
            outs[(fold, k)] = (o.token_ids, [lp[t] for lp, t in zip(o.logprobs, o.token_ids)])
            del llm
    assert calls, "the fold never ran"
    assert outs[(True, 1)] == outs[(False, 1)]
    assert outs[(True, 4)] == outs[(False, 4)]
