"""Fused Triton add+RMSNorm, SiLU*mul and rotary+KV write vs their plain-PyTorch references.

Random inputs; on the GPU when there is one, else under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tierserve.attention.backend import AttnMetadata, write_kv  # noqa: E402
from tierserve.models.layers import triton_fused as fused  # noqa: E402
from tierserve.models.layers.norm import RMSNorm  # noqa: E402
from tierserve.models.layers.rotary import RopeConfig, RotaryEmbedding  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def _exact_or_close(got, want, dtype):
    # same rounding steps; only fp32 reduction order may differ (one bf16 ulp at most on the GPU). The
    # CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest: a few ulps there.
    if dtype == torch.float32:
        tol = 1e-6
    else:
        tol = 8e-3 if DEV == "cuda" else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_matches_reference(dtype, with_residual):
    torch.manual_seed(0)
    n = 96
    x = torch.randn(5, n, device=DEV).to(dtype)
    r = torch.randn(5, n, device=DEV).to(dtype) if with_residual else None
    norm = RMSNorm(n, 1e-5, device=DEV, dtype=dtype)
    norm.weight.data = torch.randn(n, device=DEV).to(dtype)
    out, res = fused.add_rmsnorm(x, r, norm.weight, norm.eps)
    want_res = x + r if with_residual else x
    _exact_or_close(res, want_res, dtype)
    _exact_or_close(out, norm(want_res), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(dtype):
    torch.manual_seed(1)
    gu = torch.randn(3, 2 * 80, device=DEV).to(dtype) * 3
    gate, up = gu.chunk(2, dim=-1)
    _exact_or_close(fused.silu_mul(gu), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("write", [True, False])
def test_rope_write_kv_matches_reference(dtype, write):
    torch.manual_seed(2)
    T, hq, hkv, D, page, N = 5, 4, 2, 16, 4, 6
    rope = RotaryEmbedding(D, 64, RopeConfig(theta=500.0, rope_type="llama3",
                                            params={"factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}))
    rope.build(DEV)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=DEV).to(dtype)
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    q, k, v = q.view(T, hq, D), k.view(T, hkv, D), v.view(T, hkv, D)
    pos = torch.tensor([0, 3, 17, 40, 63], device=DEV)
    pages = torch.tensor([1, 1, 4, 0, 5], device=DEV)
    offs = torch.tensor([0, 3, 1, 2, 3], device=DEV)
    meta = AttnMetadata(num_seqs=T, num_tokens=T, page_size=page, positions=pos, slot_pages=pages,
                        slot_offsets=offs, query_start_loc=torch.arange(T + 1, device=DEV), seq_lens=pos + 1,
                        page_table=pages[:, None])
    kv_ref = torch.randn(N, 2, page, hkv, D, device=DEV).to(dtype)
    kv_got = kv_ref.clone()
    want_q, want_k = RotaryEmbedding.apply(rope.cos_sin(pos, dtype), q.clone(), k.clone())
    write_kv(want_k, v, kv_ref, meta)
    fused.rope_write_kv(q, k, v, rope.cos, rope.sin, pos, kv_got if write else None, pages, offs)
    _exact_or_close(q, want_q, dtype)
    _exact_or_close(k, want_k, dtype)
    if write:
        _exact_or_close(kv_got, kv_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_folds_keys_into_page_summaries(dtype):
    """Pages with a key min / max row (sparse "pages" selector): a decode step (distinct pages; offset 0 starts
    a page over) written by the fused kernel equals write_kv's summary update, random keys and old summaries."""
    torch.manual_seed(3)
    T, hq, hkv, D, page, N = 4, 4, 2, 16, 4, 7
    rope = RotaryEmbedding(D, 64, RopeConfig(theta=10000.0))
    rope.build(DEV)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=DEV).to(dtype)
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    q, k, v = q.view(T, hq, D), k.view(T, hkv, D), v.view(T, hkv, D)
    offs = torch.tensor([0, 3, 1, 2], device=DEV)
    pos = torch.tensor([8, 19, 29, 62], device=DEV)
    pages = torch.tensor([2, 4, 0, 6], device=DEV)
    meta = AttnMetadata(num_seqs=T, num_tokens=T, page_size=page, positions=pos, slot_pages=pages,
                        slot_offsets=offs, query_start_loc=torch.arange(T + 1, device=DEV), seq_lens=pos + 1,
                        page_table=pages[:, None], decode_only=True)
    kv_ref = torch.randn(N, 2, page + 1, hkv, D, device=DEV).to(dtype)
    kv_start, kv_got = kv_ref.clone(), kv_ref.clone()
    want_q, want_k = RotaryEmbedding.apply(rope.cos_sin(pos, dtype), q.clone(), k.clone())
    write_kv(want_k, v, kv_ref, meta)
    fused.rope_write_kv(q, k, v, rope.cos, rope.sin, pos, kv_got, pages, offs, page)
    _exact_or_close(kv_got[:, :, :page], kv_ref[:, :, :page], dtype)
    # the summary rows: write_kv's update (a reference rotation may differ by an ulp on the GPU) ...
    _exact_or_close(kv_got[:, :, page], kv_ref[:, :, page], dtype)
    # ... and exactly the fold of the keys the kernel stored into the old rows
    kept = kv_got[pages, 0, offs]                                        # [T, Hkv, D] the stored keys
    base_min, base_max = kv_start[pages, 0, page], kv_start[pages, 1, page]
    first = (offs == 0)[:, None, None]
    assert torch.equal(kv_got[pages, 0, page], torch.where(first, kept, torch.minimum(base_min, kept)))
    assert torch.equal(kv_got[pages, 1, page], torch.where(first, kept, torch.maximum(base_max, kept)))
    assert torch.equal(kv_got[1, :, page], kv_ref[1, :, page])          # untouched pages keep their rows
    assert torch.equal(kv_got[2, 0, page], kv_got[2, 0, 0]) and torch.equal(kv_got[2, 1, page], kv_got[2, 0, 0])
