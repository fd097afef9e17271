"""A prefill chunk over FP8 KV pages on fresh random inputs, with the torch reference's output: pages stored in
place and in compact slots (some left at full precision), for the flash paths' tests (test_fp8_flash_prefill.py,
test_sparse_fp8_prefill.py)."""
import torch

from tierserve.attention.backend import AttnMetadata
from tierserve.attention.torch_ref import TorchRefBackend
from tierserve.kv.fp8_pages import Fp8PagePolicy
from tierserve.quant.fp8_compact import new_compact_pool, store_compact_
from tierserve.quant.fp8_kv import quantise_pages_
from tierserve.runner.kv_fp8 import Fp8Pages

DEV = "cuda" if torch.cuda.is_available() else "cpu"          # on CUDA the unmasked parts run the flash kernel


def fp8_chunk_case(hq, hkv, ps, D, n, k, sink, recent, dtype, compact_slots=0, seed=0, sparse=None, full_every=4):
    """A sequence of ``n`` tokens whose last ``k`` are the chunk; ``sink`` / ``recent`` the FP8 settings. Pages no
    query of the chunk reads at full precision are stored in FP8 except every ``full_every``-th (from the second);
    every other one of those goes into a compact slot while there are ``compact_slots``. ``sparse`` (a SparseConfig):
    the pages carry their key min / max summary row and the reference applies the sparse rule.
    Returns (data [N, 1, 2, rows, Hkv, D], table, Fp8Pages, q [k, Hq, D], the reference's output)."""
    g = torch.Generator().manual_seed(seed)
    pages = -(-n // ps)
    N = pages + 6
    mag = torch.exp2(torch.randint(-3, 4, (N, 1, 2, 1, hkv, 1), generator=g).float())
    data = torch.randn(N, 1, 2, ps + (sparse is not None), hkv, D, generator=g) * mag
    if sparse is not None:                   # the key min / max summary rows
        data[:, :, 0, ps], data[:, :, 1, ps] = data[:, :, 0, :ps].amin(2), data[:, :, 0, :ps].amax(2)
    data = data.to(DEV, dtype)
    table = torch.randperm(N, generator=g)[:pages + 1].to(DEV)
    pool = new_compact_pool(compact_slots, 1, ps, hkv, D, int(sparse is not None), dtype, DEV) \
        if compact_slots else None
    fp8 = Fp8Pages(N, ps, sink, recent, DEV, compact=pool)
    pol = Fp8PagePolicy(ps, sink, recent)
    ok = [i for i in range(-(-(n - k) // ps)) if i * ps >= sink and not pol.needs_full(i, n - k)
          and (i + 1) * ps <= n - k]
    stored = [i for j, i in enumerate(ok) if j % full_every != 1]
    slot = 0
    for j, i in enumerate(stored):
        if pool is not None and j % 2 == 0 and slot < compact_slots:
            store_compact_(data, pool, table[i:i + 1], torch.tensor([slot], device=DEV), ps)
            table[i] = N + slot
            slot += 1
        else:                                  # in place (also next to a compact pool: the reference reads both)
            quantise_pages_(data, table[i:i + 1], ps)
            fp8.quantised[table[i]] = True
    q = torch.randn(k, hq, D, generator=g).to(DEV, dtype)
    pos = torch.arange(n - k, n, device=DEV)
    z = torch.zeros(k, dtype=torch.long, device=DEV)
    meta = AttnMetadata(num_seqs=1, num_tokens=k, page_size=ps, positions=pos, slot_pages=z, slot_offsets=z,
                        query_start_loc=torch.tensor([0, k], device=DEV), seq_lens=torch.tensor([n], device=DEV),
                        page_table=table[None], query_lens_cpu=[k], seq_lens_cpu=[n], kv_fp8=fp8, sparse=sparse)
    want = TorchRefBackend().forward(q, None, None, data[:, 0], meta, D ** -0.5, None, 0, kv_written=True)
    return data, table, fp8, q, want
