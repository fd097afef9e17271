"""Paged V4 state (``paged_state.py``): the slot decoder reading compressed entries / indexer keys through a
page table equals ``decode_batch`` (fp32, CPU): pages of 2 / 4 tokens (smaller than the HCA ratios 8 / 16)
and 16 with HCA 128, shuffled non-contiguous page ids handed out as the sequences grow (as the KV manager
does), prompts over several pages, a padding row, kv_dtype auto and fp8; ``EntryPool`` geometry and bytes."""
import random

import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import one_thread, rand_ids, tiny_models  # noqa: F401 (one_thread: autouse)
from tests.models.test_deepseek_v4_batch import assert_slots_match, assert_states_close
from tierserve.models.deepseek_v4.kv_bytes import entry_bytes
from tierserve.models.deepseek_v4.paged_state import EntryPool, PagePools
from tierserve.models.deepseek_v4.static_decode import decode_static
from tierserve.models.deepseek_v4.static_state import StaticState

STEPS = 30
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory)


class Pages:
    """A stand-in for the KV manager: shuffled page ids, a table per sequence that grows on demand."""

    def __init__(self, num_pages: int, page_size: int, seed: int = 0) -> None:
        self.free = list(range(num_pages))
        random.Random(seed).shuffle(self.free)
        self.page_size = page_size

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        while len(table) * self.page_size < num_tokens:
            table.append(self.free.pop())
        return table


def _start(model, lengths):
    states, toks = [], []
    for i, n in enumerate(lengths):
        logits, st = model.prefill(torch.tensor(rand_ids(n, seed=i + 3)))
        states.append(st)
        toks.append(int(logits[-1].argmax()))
    return states, toks


CASES = [("mixed", 4, (21, 37)), ("mixed", 2, (45,)), ("hca-first", 4, (29, 50)), ("hca-first", 8, (9, 40)),
         ("hca128", 16, (100, 130))]


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("name,page_size,lengths", CASES)
def test_paged_slot_decode_equals_decode_batch(models, name, page_size, lengths, kv_dtype):
    model = models[name].set_kv_dtype(kv_dtype)
    try:
        ref, tok = _start(model, lengths)
        B, max_len = len(lengths), 256
        pages = Pages(B * max_len // page_size + 7, page_size)
        pools = PagePools(model, pages.free.__len__(), page_size)
        ss = StaticState(model, slots=B + 1, max_len=max_len, pools=pools)       # + a padding row
        tables = [pages.grow([], st.num_tokens + 1) for st in ref]
        for b, st in enumerate(ref):
            ss.load(b, st, tables[b])
        ids = torch.zeros(B + 1, dtype=torch.long)
        for _ in range(STEPS):
            for b, st in enumerate(ref):            # the KV manager's allocate() before the step
                ss.set_pages(b, pages.grow(tables[b], st.num_tokens + 1))
            want, ref = model.decode_batch(torch.tensor(tok), ref)
            ids[:B] = torch.tensor(tok)
            got = decode_static(model, ss, ids)[:B]
            torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(want, -1), atol=ATOL, rtol=0)
            tok = want.argmax(-1).tolist()
            assert got.argmax(-1).tolist() == tok
        assert ss.page_table[B].eq(pools.scratch).all()          # the padding row wrote only to scratch
        assert_slots_match(ss, ref)
    finally:
        model.set_kv_dtype("auto")


def test_move_and_clear_keep_pages(models):
    """``move`` moves the page-table row (not the pages); the vacated row points at scratch."""
    model = models["mixed"]
    (st,), _ = _start(model, (19,))
    pools = PagePools(model, 40, 4)
    ss = StaticState(model, slots=3, max_len=64, pools=pools)
    table = [33, 2, 17, 8, 25]
    ss.load(2, st, table)
    before = [p.data.clone() for p in pools.pools()]
    ss.move(2, 0)
    assert all(torch.equal(a, p.data) for a, p in zip(before, pools.pools()))
    assert ss.page_table[0, :5].tolist() == table and ss.page_table[2].eq(pools.scratch).all()
    for x, y in zip(ss.export(0, 19).layers, st.layers):
        assert_states_close(x, y)
    with pytest.raises(ValueError, match="need"):
        ss.load(1, st, table[:2])                    # too few pages for its entries


def test_entry_pool_layout_and_bytes():
    # V4 sizes: CSA (ratio 4) bf16 rows of 512 and HCA (ratio 128) MODEL1 rows of 584 B in pages of 16 tokens
    csa = EntryPool(4, (512,), torch.bfloat16, 3, 16, "meta")
    hca = EntryPool(128, (entry_bytes(512, 64, "model1"),), torch.uint8, 3, 16, "meta")
    assert (csa.per_page, csa.pieces, csa.bytes_per_page) == (4, 1, 4 * 1024)
    assert (hca.per_page, hca.pieces, hca.width, hca.bytes_per_page) == (1, 8, 73, 73)
    assert hca.bytes_per_page * 128 // 16 == 584                # no padding: exactly entry_bytes * ps / m
    with pytest.raises(ValueError, match="divide"):
        EntryPool(4, (8,), torch.float32, 3, 6, "cpu")
    # round trip over shuffled pages, ratio > page size with a row that needs padding (7 values in 2 pieces)
    pool = EntryPool(8, (7,), torch.float32, 20, 4, "cpu")
    rows = torch.randn(5, 7)
    pages = [11, 3, 19, 0, 7, 5, 14, 2, 9, 1]
    pool.write(pages, rows)
    assert torch.equal(pool.read(pages, 5), rows)
    assert torch.equal(pool.data[3, 0], torch.cat([rows[0, 4:], torch.zeros(1)]))   # entry 0, 2nd piece, padded
    # gather_first (whole pages) == gather (per entry), for pieces and for several entries per page
    for ratio, ps in ((8, 4), (4, 16), (4, 4)):
        pool = EntryPool(ratio, (3, 5), torch.float32, 30, ps, "cpu")
        pool.data.normal_()
        table = torch.stack([torch.randperm(30)[:12], torch.randperm(30)[:12]])
        for n in (0, 1, 5, 12 * ps // ratio):
            want = pool.gather(table, torch.arange(n).expand(2, n))
            assert want.shape == (2, n, 3, 5) and torch.equal(pool.gather_first(table, n), want)


def test_page_bytes_match_kv_bytes(models):
    """Per page, the pools hold exactly ``kv_bytes``' per-token figure times the page size (fp32 here)."""
    from tierserve.models.deepseek_v4.kv_bytes import page_bytes, state_bytes

    for name in ("mixed", "hca-first", "hca128"):
        model = models[name]
        cfg = model.config
        for ps in (2, 4, 16):
            bf16 = state_bytes(cfg).per_token
            if name == "hca128" and ps == 2:      # 32-value rows in 64 pieces: 1 value per page, half padding
                assert PagePools.page_bytes(model, ps) - bf16 * 2 * ps == 4 / 2 * 1
            else:
                assert PagePools.page_bytes(model, ps) == bf16 * 2 * ps == 2 * page_bytes(cfg, "bf16", ps)   # fp32
            model.set_kv_dtype("fp8")
            try:
                assert PagePools.page_bytes(model, ps) == page_bytes(cfg, "model1", ps)
            finally:
                model.set_kv_dtype("auto")


@pytest.mark.parametrize("name", ["mixed", "hca-first"])
def test_context_limit_reads_only_the_first_entries(models, name):
    """``max_tokens``: the step reads ``max_tokens // m`` entries (the slot decoder's context buckets of
    16 / 32 / 64 / 256 tokens here) and still equals ``decode_batch``; also below one entry (T = 1)."""
    model = models[name]
    ref, tok = _start(model, (3, 14))
    pools = PagePools(model, 200, 4)
    ss = StaticState(model, slots=2, max_len=256, pools=pools)
    pages = Pages(200, 4)
    tables = [pages.grow([], st.num_tokens + 1) for st in ref]
    for b, st in enumerate(ref):
        ss.load(b, st, tables[b])
    for _ in range(STEPS):
        for b, st in enumerate(ref):
            ss.set_pages(b, pages.grow(tables[b], st.num_tokens + 1))
        need = max(st.num_tokens for st in ref) + 1
        limit = next(x for x in (2, 16, 32, 64, 256) if x >= need)
        want, ref = model.decode_batch(torch.tensor(tok), ref)
        got = decode_static(model, ss, torch.tensor(tok), max_tokens=limit)
        torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(want, -1), atol=ATOL, rtol=0)
        tok = want.argmax(-1).tolist()
        assert got.argmax(-1).tolist() == tok


def test_v4_flash_page_bytes():
    """The shipped V4-Flash config: the figures of docs/deepseek_v4.md ("Paged state") and `tierserve info`."""
    import json

    from tierserve.loader.hf import resolve_model_path
    from tierserve.models.deepseek_v4.config import DeepseekV4Config
    from tierserve.models.deepseek_v4.kv_bytes import page_bytes

    cfg = DeepseekV4Config.from_hf(json.loads((resolve_model_path("deepseek-v4-flash") / "config.json").read_text()))
    assert (page_bytes(cfg), page_bytes(cfg, "model1")) == (105_344, 58_959)
    assert page_bytes(cfg, "bf16", 128) == 8 * 105_344                     # HCA: one whole entry per page
