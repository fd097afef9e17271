"""Triton paged prefill vs a plain-PyTorch masked attention over the gathered pages, on random inputs.

Runs on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tierserve.attention.triton_prefill import paged_prefill  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ref_prefill(q, kc, vc, table, q_start, q_len, seq_lens, scale, window=None):
    """Each chunk's queries over its gathered pages, causal by position, fp32."""
    out = torch.zeros_like(q, dtype=torch.float32)
    page, hkv, d = kc.shape[1:]
    for c in range(len(q_len)):
        n, L, s0 = int(q_len[c]), int(seq_lens[c]), int(q_start[c])
        keys = kc[table[c]].reshape(-1, hkv, d)[:L].float().transpose(0, 1)       # [Hkv, L, D]
        vals = vc[table[c]].reshape(-1, hkv, d)[:L].float().transpose(0, 1)
        qp = q[s0:s0 + n].float().transpose(0, 1)                                  # [Hq, n, D]
        pos = torch.arange(L - n, L, device=q.device)[:, None]
        kp = torch.arange(L, device=q.device)[None, :]
        mask = kp <= pos
        if window:
            mask &= pos - kp < window
        o = torch.nn.functional.scaled_dot_product_attention(qp, keys, vals, attn_mask=mask, scale=scale,
                                                             enable_gqa=True)
        out[s0:s0 + n] = o.transpose(0, 1)
    return out


def make_case(hq, hkv, page, D, dtype, chunks, N=40, host_from=None, seed=0):
    """chunks: list of (q_len, seq_len). Returns inputs; page ids >= host_from live in a second store."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(N, 2, 2, page, hkv, D, generator=g).to(DEV, dtype)          # [N, layers, K/V, ...]
    kc, vc = data[:, 1, 0], data[:, 1, 1]
    max_pages = max(-(-L // page) for _, L in chunks) + 1
    table = torch.stack([torch.randperm(N, generator=g)[:max_pages] for _ in chunks]).to(DEV)
    q_len = torch.tensor([n for n, _ in chunks], device=DEV)
    seq_lens = torch.tensor([L for _, L in chunks], device=DEV)
    q_start = torch.cumsum(q_len, 0) - q_len
    q = torch.randn(int(q_len.sum()), hq, D, generator=g).to(DEV, dtype)
    return q, kc, vc, table, q_start, q_len, seq_lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,page,window", [(4, 2, 4, None), (8, 2, 8, None), (6, 2, 4, None),
                                                 (3, 3, 4, None), (4, 1, 4, 7)])
def test_paged_prefill_matches_reference(dtype, hq, hkv, page, window):
    D = 16
    # a fresh prompt, a continued chunk after cached context, a single token, a chunk ending mid-page
    chunks = [(21, 21), (9, 45), (1, 30), (14, 27)]
    q, kc, vc, table, q_start, q_len, seq_lens = make_case(hq, hkv, page, D, dtype, chunks, seed=hq + page)
    scale = D ** -0.5
    got = paged_prefill(q, kc, vc, table, q_start, q_len, seq_lens, max(n for n, _ in chunks), scale,
                        sliding_window=window, block_rows=32, block_n=16)
    want = ref_prefill(q, kc, vc, table, q_start, q_len, seq_lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_paged_prefill_reads_host_pages():
    """Page ids >= num_device_pages are read from a second (host) store with the same layout."""
    hq, hkv, page, D, n_dev = 4, 2, 4, 16, 24
    chunks = [(10, 40), (7, 7)]
    q, kc, vc, table, q_start, q_len, seq_lens = make_case(hq, hkv, page, D, torch.float32, chunks, seed=3)
    scale = D ** -0.5
    want = ref_prefill(q, kc, vc, table, q_start, q_len, seq_lens, scale)
    # move pages >= n_dev to a "host" store (pinned CPU RAM on a GPU; another tensor on the CPU)
    host = torch.zeros(kc.shape[0] - n_dev, 2, 2, page, hkv, D)
    host[:, 1, 0], host[:, 1, 1] = kc[n_dev:].cpu(), vc[n_dev:].cpu()
    if DEV == "cuda":
        host = host.pin_memory()
    dev_k, dev_v = kc.clone(), vc.clone()
    dev_k[n_dev:], dev_v[n_dev:] = float("nan"), float("nan")        # must never be read
    got = paged_prefill(q, dev_k[:n_dev], dev_v[:n_dev], table, q_start, q_len, seq_lens, 10, scale,
                        host_cache=(host[:, 1, 0], host[:, 1, 1]), num_device_pages=n_dev,
                        block_rows=32, block_n=16)
    assert bool((table >= n_dev).any())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEV != "cuda", reason="real sizes on the GPU only")
def test_paged_prefill_real_size():
    hq, hkv, page, D = 32, 8, 16, 128
    chunks = [(512, 512), (300, 2348)]
    q, kc, vc, table, q_start, q_len, seq_lens = make_case(hq, hkv, page, D, torch.bfloat16, chunks, N=200)
    got = paged_prefill(q, kc, vc, table, q_start, q_len, seq_lens, 512, D ** -0.5)
    want = ref_prefill(q, kc, vc, table, q_start, q_len, seq_lens, D ** -0.5)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
