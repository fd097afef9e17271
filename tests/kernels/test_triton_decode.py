"""Triton paged decode attention vs the plain-PyTorch reference on random inputs.

Runs on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tierserve.attention.backend import AttnMetadata  # noqa: E402
from tierserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from tierserve.attention.triton_decode import paged_decode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ref_decode(q, kc, vc, table, seq_lens, scale, window=None):
    B = q.shape[0]
    meta = AttnMetadata(num_seqs=B, num_tokens=B, page_size=kc.shape[1],
                        positions=seq_lens - 1, slot_pages=torch.zeros(B, dtype=torch.long, device=q.device),
                        slot_offsets=torch.zeros(B, dtype=torch.long, device=q.device),
                        query_start_loc=torch.arange(B + 1, device=q.device), seq_lens=seq_lens,
                        page_table=table, query_lens_cpu=[1] * B, seq_lens_cpu=seq_lens.tolist())
    be = TorchRefBackend()
    p = be._prep(meta, window)
    keys = kc[table].reshape(B, -1, kc.shape[2], kc.shape[3]).transpose(1, 2).float()
    vals = vc[table].reshape(B, -1, kc.shape[2], kc.shape[3]).transpose(1, 2).float()
    qp = q.float()[:, :, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        qp, keys, vals, attn_mask=p["mask"][:, None], scale=scale, enable_gqa=True)[:, :, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,page,splits,window", [(4, 2, 4, 1, None), (8, 2, 8, 3, None),
                                                        (6, 6, 4, 2, None), (4, 1, 4, 2, 5)])
def test_paged_decode_matches_reference(dtype, hq, hkv, page, splits, window):
    torch.manual_seed(hq * 100 + page + splits)
    B, D, N = 3, 16, 24
    # page-major storage like KVCache: [N, layers, 2, page, H, D] -> strided per-layer views
    data = torch.randn(N, 2, 2, page, hkv, D, device=DEV).to(dtype)
    kc, vc = data[:, 1, 0], data[:, 1, 1]
    seq_lens = torch.tensor([1, 13, 37], device=DEV)
    max_pages = 10
    table = torch.stack([torch.randperm(N, device=DEV)[:max_pages] for _ in range(B)])   # any page ids
    q = torch.randn(B, hq, D, device=DEV).to(dtype)
    scale = D ** -0.5
    got = paged_decode(q, kc, vc, table, seq_lens, scale, num_splits=splits,
                       sliding_window=window, block_n=16)
    want = ref_decode(q, kc, vc, table, seq_lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_selected_pages_match_masked_reference(dtype):
    """The decode kernel over per-(sequence, KV head) selected pages == masked dense attention."""
    from tierserve.attention.triton_decode import compact_selection
    torch.manual_seed(7)
    B, hq, hkv, page, D, N, P = 3, 8, 2, 4, 16, 40, 9
    data = torch.randn(N, 1, 2, page, hkv, D, device=DEV).to(dtype)
    kc, vc = data[:, 0, 0], data[:, 0, 1]
    seq_lens = torch.tensor([9, 23, 36], device=DEV)
    table = torch.stack([torch.randperm(N, device=DEV)[:P] for _ in range(B)])
    q = torch.randn(B, hq, D, device=DEV).to(dtype)
    n_pages = (seq_lens + page - 1) // page
    chosen = torch.rand(B, hkv, P, device=DEV) < 0.5
    ar = torch.arange(P, device=DEV)
    chosen &= ar[None, None, :] < n_pages[:, None, None]
    chosen |= ar[None, None, :] == (n_pages - 1)[:, None, None]            # the last page always
    sel, lens = compact_selection(chosen, table, seq_lens, page)
    got = paged_decode(q, kc, vc, sel, lens, D ** -0.5, num_splits=2, block_n=16)
    # reference: dense attention with keys outside the selection masked, per KV head
    keys = kc[table].reshape(B, -1, hkv, D).permute(0, 2, 1, 3).float()     # [B, Hkv, L, D]
    vals = vc[table].reshape(B, -1, hkv, D).permute(0, 2, 1, 3).float()
    L = P * page
    pos = torch.arange(L, device=DEV)
    mask = chosen.repeat_interleave(page, dim=-1) & (pos[None, None, :] < seq_lens[:, None, None])
    qg = q.float().view(B, hkv, hq // hkv, D)
    want = torch.nn.functional.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask[:, :, None, :],
                                                            scale=D ** -0.5).reshape(B, hq, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
