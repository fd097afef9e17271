"""A step mixing decodes, a fresh prompt and continued prefill chunks: the GPU backend's split path
(paged decode kernel + per-chunk SDPA) == the torch reference, on random inputs and page tables."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tierserve.attention.backend import AttnMetadata  # noqa: E402
from tierserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from tierserve.attention.triton_backend import TritonBackend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _meta(qlens, seqlens, page, table):
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    pos = torch.cat([torch.arange(s - n, s) for n, s in zip(qlens, seqlens)]).to(DEV)
    b_of = torch.repeat_interleave(torch.arange(len(qlens)), torch.tensor(qlens)).to(DEV)
    return AttnMetadata(num_seqs=len(qlens), num_tokens=qsl[-1], page_size=page, positions=pos,
                        slot_pages=table[b_of, pos // page], slot_offsets=pos % page,
                        query_start_loc=torch.tensor(qsl, device=DEV), seq_lens=torch.tensor(seqlens, device=DEV),
                        page_table=table, query_lens_cpu=list(qlens), seq_lens_cpu=list(seqlens),
                        decode_only=all(n == 1 for n in qlens))


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_step_matches_reference(window, dtype):
    torch.manual_seed(11 + (window or 0))
    hq, hkv, D, page, N = 4, 2, 16, 4, 40
    qlens, seqlens = [1, 7, 5, 1, 9], [20, 7, 16, 3, 30]     # decode, fresh, continued, decode, continued
    P = max(-(-s // page) for s in seqlens)
    # distinct pages per sequence (as the engine allocates them), in random order
    table = torch.randperm(N, device=DEV)[:len(qlens) * P].view(len(qlens), P)
    kv_ref = torch.randn(N, 2, page, hkv, D, device=DEV).to(dtype)      # earlier context: random pages
    kv_got = kv_ref.clone()
    T = sum(qlens)
    q = torch.randn(T, hq, D, device=DEV).to(dtype)
    k = torch.randn(T, hkv, D, device=DEV).to(dtype)
    v = torch.randn(T, hkv, D, device=DEV).to(dtype)
    want = TorchRefBackend().forward(q, k, v, kv_ref, _meta(qlens, seqlens, page, table), D ** -0.5, window)
    got = TritonBackend().forward(q, k, v, kv_got, _meta(qlens, seqlens, page, table), D ** -0.5, window)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    t0 = 0
    for kind, n in zip(("decode", "fresh", "continued", "decode", "continued"), qlens):   # name the failing part
        torch.testing.assert_close(got[t0:t0 + n].float(), want[t0:t0 + n].float(), atol=tol, rtol=tol,
                                   msg=lambda m: f"{kind} rows {t0}:{t0 + n}: {m}")
        t0 += n
    assert torch.equal(kv_got, kv_ref)          # both wrote the step's keys and values identically
