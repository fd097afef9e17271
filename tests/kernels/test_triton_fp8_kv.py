"""FP8 KV kernels (issue 6): page quantisation into storage and into the prefill scratch (byte-identical to
``quant.fp8_kv.quantise_pages_``), and the FP8 prefill kernel on long chunks (uniform FP8 blocks read from
stored pages and from the scratch, mixed blocks at the keep_recent edge, the in-kernel fallback) vs the
torch reference. GPU when there is one, else the CPU under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tierserve.attention.backend import AttnMetadata
from tierserve.attention.torch_ref import TorchRefBackend
from tierserve.attention.triton_fp8_quant import (
    prefill_scratch,
    quantise_pages_triton,
    scale_offset,
    scratch_pages_per_chunk,
)
from tierserve.attention.triton_prefill_fp8 import paged_prefill_fp8
from tierserve.kv.fp8_pages import Fp8PagePolicy
from tierserve.quant.fp8_kv import quantise_pages_
from tierserve.runner.kv_fp8 import Fp8Pages

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ps,h,d", [(16, 2, 16), (8, 3, 32), (4, 1, 16)])
def test_store_quantisation_byte_identical(dtype, ps, h, d):
    g = torch.Generator().manual_seed(ps + h)
    mag = torch.logspace(-30, 30, 7)[:, None, None, None, None, None]      # scales far from 1 both ways
    data = (torch.randn(7, 3, 2, ps + 1, h, d, generator=g) * mag).to(dtype)
    data[1, 0, 0, :, 0] = 0                                                 # an all-zero (page, head): scale 1
    data[4, 2, 1, 1, 0, :3] = torch.tensor([1e-41, -3e-40, 448.0]).to(dtype)   # subnormals, e4m3 max
    a, b = data.clone().to(DEV), data.clone().to(DEV)
    pids = torch.tensor([1, 4, 5, 6], device=DEV)
    quantise_pages_(a, pids, ps)
    quantise_pages_triton(b, pids, ps, group=3)                             # two groups
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))           # codes, scales, zeros, summaries


def _pages(seq_lens, ps, N, g):
    B, P = len(seq_lens), max(-(-n // ps) for n in seq_lens) + 1
    perm = torch.randperm(N, generator=g)
    table = torch.randint(0, N, (B, P), generator=g)
    used = 0
    for b, n in enumerate(seq_lens):
        k = -(-n // ps)
        table[b, :k] = perm[used:used + k]
        used += k
    return table


def test_prefill_scratch_matches_storage_quantisation():
    """Each scratch page = the page's FP8 blob as storage would hold it (a partial last page: its valid rows,
    the rest counted as zero); a page already stored is copied."""
    ps, h, d, N, recent = 4, 2, 16, 40, 5
    g = torch.Generator().manual_seed(1)
    lens, qlens = [23, 9, 30], [10, 9, 3]
    data = torch.randn(N, 1, 2, ps, h, d, generator=g).to(DEV)
    table = _pages(lens, ps, N, g).to(DEV)
    flags = torch.zeros(N, dtype=torch.bool, device=DEV)
    flags[table[0, 3]] = True                                     # a stored page: copied as it is
    quantise_pages_(data, table[0, 3:4], ps)
    scratch, offs = prefill_scratch(data[:, 0], flags, table, torch.tensor(qlens, device=DEV),
                                    torch.tensor(lens, device=DEV), max(qlens), sum(qlens), ps, recent)
    sp = scratch_pages_per_chunk(max(qlens), ps, recent)
    used = 0
    blk = scale_offset(ps, h, d) + 4 * h
    checked = 0
    for c, (n, k) in enumerate(zip(lens, qlens)):
        first = max(n - k - max(recent, 1), 0) // ps
        assert -(-n // ps) - first <= sp and int(offs[c]) == used
        used += -(-n // ps) - first
        for i in range(first, -(-n // ps)):
            pid = int(table[c, i])
            page = data[pid:pid + 1].clone()
            if not bool(flags[pid]):
                page[:, :, :, n - i * ps:] = 0                    # rows past the sequence
                quantise_pages_(page, torch.tensor([0], device=DEV), ps)
            want = page.view(torch.uint8).reshape(2, -1)[:, :blk]
            got = scratch[used - -(-n // ps) + i]
            assert torch.equal(got[:, :ps * h * d], want[:, :ps * h * d])
            assert torch.equal(got[:, blk - 4 * h:], want[:, blk - 4 * h:])
            checked += 1
    assert checked == 10 and scratch.shape[0] >= used


PREFILL = [  # hq, hkv, page, D, seq_lens, q_lens, keep_sink, keep_recent, window
    (8, 2, 4, 16, [70, 45], [40, 45], 5, 7, None),          # continued + fresh chunk, GQA, mixed + uniform blocks
    (4, 2, 16, 16, [100, 37], [33, 20], 0, 0, None),        # no sink / recent: FP8 as soon as a page is complete
    (4, 1, 8, 32, [61, 90], [25, 50], 16, 1, None),
    (4, 2, 4, 16, [66], [30], 3, 100, None),                # window covers everything: no FP8 read
    (4, 1, 8, 16, [90, 50], [30, 50], 4, 9, 20),            # sliding window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(PREFILL)))
def test_fp8_prefill_long_chunks_match_reference(dtype, case):
    _prefill_case(dtype, case, *PREFILL[case])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_prefill_stored_pages_read_at_full_precision(dtype):
    """Pages stored under a narrower sink / window than the kernel reads with (the page policy never does
    this): rows that read them at full precision get their FP8 values, like the reference."""
    _prefill_case(dtype, 0, *PREFILL[0], widen=(4, 9))


def _prefill_case(dtype, case, hq, hkv, ps, D, lens, qlens, sink, recent, window, widen=(0, 0)):
    g = torch.Generator().manual_seed(10 + case)
    N = sum(-(-n // ps) for n in lens) + 8
    mag = torch.exp2(torch.randint(-3, 4, (N, 1, 2, 1, hkv, 1), generator=g).float())
    data = (torch.randn(N, 2, 2, ps, hkv, D, generator=g) * mag).to(DEV, dtype)
    table = _pages(lens, ps, N, g).to(DEV)
    q = torch.randn(sum(qlens), hq, D, generator=g).to(DEV, dtype)
    fp8 = Fp8Pages(N, ps, sink, recent, DEV)
    pol = Fp8PagePolicy(ps, sink, recent)
    # pages no query of the chunks reads at full precision: most stored, a few left (the kernel's fallback)
    ok = [int(table[b, i]) for b, (n, k) in enumerate(zip(lens, qlens)) for i in range(-(-(n - k) // ps))
          if i * ps >= sink and not pol.needs_full(i, n - k) and (i + 1) * ps <= n - k]
    qsl = [0]
    for k in qlens:
        qsl.append(qsl[-1] + k)
    pos = torch.cat([torch.arange(n - k, n) for n, k in zip(lens, qlens)]).to(DEV)
    z = torch.zeros(len(pos), dtype=torch.long, device=DEV)
    meta = AttnMetadata(num_seqs=len(lens), num_tokens=qsl[-1], page_size=ps, positions=pos, slot_pages=z,
                        slot_offsets=z, query_start_loc=torch.tensor(qsl, device=DEV),
                        seq_lens=torch.tensor(lens, device=DEV), page_table=table, query_lens_cpu=qlens,
                        seq_lens_cpu=list(lens), kv_fp8=Fp8Pages(N, ps, 0, 1 << 20, DEV))
    plain = TorchRefBackend().forward(q.float(), None, None, data[:, 1].float(), meta, D ** -0.5, window, 1,
                                      kv_written=True)                      # every key at full precision
    fp8.quantise(data, [p for j, p in enumerate(ok) if j % 5 != 2])
    sink, recent = sink + widen[0], recent + widen[1]
    fp8.keep_sink, fp8.keep_recent = sink, recent
    meta.kv_fp8 = fp8
    # the reference reads the storage as it is (FP8 blobs live in the storage dtype's bytes)
    want = TorchRefBackend().forward(q, None, None, data[:, 1], meta, D ** -0.5, window, 1,
                                     kv_written=True).float()
    got = paged_prefill_fp8(q, data[:, 1], fp8.quantised, table, torch.tensor(qsl[:-1], device=DEV),
                            torch.tensor(qlens, device=DEV), meta.seq_lens, max(qlens), D ** -0.5, ps, sink,
                            recent, sliding_window=window)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    else:
        torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
    if recent < 100:        # FP8 reads really happened
        assert (got.float() - plain).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_decode_stored_page_read_at_full_precision(dtype):
    """The decode kernel's loads follow the read rule; where a stored page is read at full precision (pages
    stored under a narrower window than the one read with -- the page policy never does this) it still
    gives the page's FP8 values, like the reference; pending pages (old, not stored) are quantised on the fly."""
    from tierserve.attention.triton_decode_fp8 import paged_decode_fp8

    hq, hkv, ps, D, lens = 8, 2, 4, 16, [37, 22, 5]
    g = torch.Generator().manual_seed(3)
    N = sum(-(-n // ps) for n in lens) + 4
    data = torch.randn(N, 1, 2, ps, hkv, D, generator=g).to(DEV, dtype)
    table = _pages(lens, ps, N, g).to(DEV)
    seq = torch.tensor(lens, device=DEV)
    q = torch.randn(len(lens), hq, D, generator=g).to(DEV, dtype)
    pol = Fp8PagePolicy(ps, 3, 5)
    old = [int(table[b, i]) for b, n in enumerate(lens) for i in range(n // ps)
           if i * ps >= 3 and not pol.needs_full(i, n - 1)]
    fp8 = Fp8Pages(N, ps, 6, 11, DEV)                  # read with a wider sink and window than stored under
    fp8.quantise(data, old[1:])                         # old[0] stays pending
    z = torch.zeros(len(lens), dtype=torch.long, device=DEV)
    meta = AttnMetadata(num_seqs=len(lens), num_tokens=len(lens), page_size=ps, positions=seq - 1, slot_pages=z,
                        slot_offsets=z, query_start_loc=torch.arange(len(lens) + 1, device=DEV), seq_lens=seq,
                        page_table=table, query_lens_cpu=[1] * len(lens), seq_lens_cpu=lens, decode_only=True,
                        kv_fp8=fp8)
    want = TorchRefBackend().forward(q, None, None, data[:, 0], meta, D ** -0.5, None, 0, kv_written=True).float()
    for splits, bn in ((1, None), (3, 16)):
        got = paged_decode_fp8(q, data[:, 0], fp8.quantised, table, seq, D ** -0.5, ps, 6, 11,
                               num_splits=splits, block_n=bn).float()
        tol = 2e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
        torch.testing.assert_close(got, want, atol=tol, rtol=2e-5 if dtype == torch.float32 else 2e-2)
        # loads following the stored flags instead of the rule: the very same numbers
        flags = paged_decode_fp8(q, data[:, 0], fp8.quantised, table, seq, D ** -0.5, ps, 6, 11,
                                 num_splits=splits, block_n=bn, rule_loads=False).float()
        assert torch.equal(flags, got)
