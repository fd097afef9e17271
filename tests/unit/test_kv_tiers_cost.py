"""The load-vs-recompute cost model (kv/tiers/cost.py) and the block checksum formats (codec.py)."""
import hashlib
import struct

import numpy as np
import pytest
import torch

from tierserve.kv.tiers import codec
from tierserve.kv.tiers.cost import LoadPolicy, PrefillCost


def _chunks(cost: PrefillCost, a: float, b: float, total: int, chunk: int) -> None:
    """A chunked prefill of ``total`` tokens on a machine costing a + b x context per token."""
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        attended = n * start + n * (n + 1) // 2
        cost.observe(n, a * n + b * attended, attended)


def test_fit_recovers_per_token_and_attention_cost():
    cost = PrefillCost()
    _chunks(cost, 50e-6, 2e-9, 32768, 2048)
    assert cost.a == pytest.approx(50e-6, rel=1e-6) and cost.b == pytest.approx(2e-9, rel=1e-6)
    # a 128k prefix costs far more per token than the chunks it was fitted on
    est = cost.estimate(131072)
    assert est == pytest.approx(50e-6 * 131072 + 2e-9 * 131072 * 131073 / 2, rel=1e-6)
    assert est / 131072 > 3 * 50e-6


def test_compile_time_steps_are_outliers():
    cost = PrefillCost()
    cost.observe(2048, 30.0, 2048 * 2049 // 2)            # the first step compiles: 30 s
    _chunks(cost, 50e-6, 0.0, 16384, 2048)
    assert cost.a == pytest.approx(50e-6, rel=0.05) and cost.estimate(1000) < 0.06


def test_few_samples_use_the_fastest_rate_and_small_steps_are_ignored():
    cost = PrefillCost()
    cost.observe(16, 1.0)                                  # below MIN_TOKENS: not a prefill sample
    assert not cost.measured and cost.estimate(100) is None
    cost.observe(1000, 5.0)
    cost.observe(1000, 1e-3)
    assert cost.per_token() == pytest.approx(1e-6)


def test_policy_records_its_choice_and_estimates():
    pol = LoadPolicy("cost")
    assert pol.pays(["disk"] * 4, 1 << 20, 16, 0) and pol.last is None    # nothing measured: load
    pol.prefill.set_flat(1e-4)                            # 64 tokens: 6.4 ms to recompute
    pol.measure("disk", 1 << 30, 1.0)                      # 1 GiB/s: 4 MiB in ~4 ms + the copy-in
    assert pol.pays(["disk"] * 4, 1 << 20, 16, 0)
    assert pol.last["choice"] == "load" and pol.last["est_recompute_s"] == pytest.approx(6.4e-3)
    for _ in range(30):
        pol.measure("disk", 1 << 20, 1.0)                  # the disk slows down (averaged in)
    assert not pol.pays(["disk"] * 4, 1 << 20, 16, 0)
    assert pol.last["choice"] == "recompute" and pol.last["est_load_s"] > pol.last["est_recompute_s"]
    assert pol.decisions == {"load": 1, "recompute": 1, "stopped": 0}


def test_codec_crc_detects_a_flipped_byte_and_reads_format_1():
    toks = tuple(range(16))
    payload = np.arange(4096, dtype=np.uint8)
    blob = bytearray(codec.encode("fp", b"h" * 16, toks, payload))
    assert blob.startswith(codec.MAGIC) and bytes(codec.decode(blob, "fp", b"h" * 16, toks)) == payload.tobytes()
    blob[len(blob) // 2] ^= 1
    with pytest.raises(codec.CorruptBlock, match="checksum"):
        codec.decode(blob, "fp", b"h" * 16, toks)
    # a block written by the previous format (blake2b-16 trailer) is still served
    head = bytes(codec.encode_parts("fp", b"h" * 16, toks, payload)[0])
    old = codec.MAGIC_V1 + head[len(codec.MAGIC):] + payload.tobytes()
    old += hashlib.blake2b(old, digest_size=16).digest()
    assert bytes(codec.decode(old, "fp", b"h" * 16, toks)) == payload.tobytes()
    assert struct.calcsize("<I") == 4


def test_warm_up_on_cpu_is_harmless():
    from tierserve.kv.tiers.manager import TierManager
    tm = TierManager((2, 4), torch.float32, "fp", host_pages=4, device=torch.device("cpu"))
    assert tm.zero_copy is None and tm.stats()["policy"]["name"] == "cost"


def test_engine_feeds_prefill_steps_with_their_context(tmp_path):
    """Chunked prefill steps reach the cost model with the tokens they attend to (later chunks attend to more),
    and the engine's tier manager has its one-time work done at start."""
    from tests.helpers.tiny_models import make_checkpoint
    from tierserve import LLM, SamplingParams

    ckpt = make_checkpoint(tmp_path / "llama", "llama")
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=256, cpu_kv_gb=0.01,
              max_num_batched_tokens=64)
    llm.generate([list(range(3, 200))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    ctxs = [x for _, x, _ in llm.engine.kv.tiers.cost.prefill.samples]
    assert len(ctxs) == 3 and ctxs == sorted(ctxs) and ctxs[0] == pytest.approx(32.5)
    assert llm.engine.kv.tiers.cost.prefill.estimate(1000) > 0


def test_a_chain_whose_reads_turn_slow_is_dropped_while_read(tmp_path, monkeypatch):
    """The disk was measured fast (say its probe came from the page cache); the reads now crawl: once reading the
    rest at the rate seen would take longer than recomputing the whole chain, the chain is dropped unread."""
    import time

    from tests.unit.test_kv_tiers_io import PS, SHAPE, chain
    from tierserve.kv.tiers.disk import DiskTier
    from tierserve.kv.tiers.manager import TierManager

    n = 200
    tm = TierManager(SHAPE, torch.float32, "fp", disk_dir=str(tmp_path), disk_bytes=1 << 30, prefetch=False)
    pages = chain(n)
    for pid, (h, toks) in enumerate(pages):
        tm.on_register(pid, h, toks)
    tm.apply(tm.take_transfers(), torch.randn(n, *SHAPE))
    tm.flush()
    tm._measure("disk", 1 << 30, 1e-3)                 # measured at 1 TB/s: loading looks free
    tm.prefill_s_per_token = 0.05 / (n * PS)           # the whole chain recomputes in 50 ms
    reads = []
    orig = DiskTier.read
    monkeypatch.setattr(DiskTier, "read", lambda self, h, t: reads.append(h) or time.sleep(0.004) or orig(self, h, t))
    tokens = [t for _, toks in pages for t in toks]
    assert tm.find(tokens, PS, 0, n, None) == []
    last = tm.stats()["policy"]["last"]
    assert last["choice"] == "recompute" and last["stopped_after_pages"] >= 64 and tm.cost.decisions["stopped"] == 1
    assert len(reads) < n


def test_read_watch_judges_the_rate_after_the_readers_warm_up():
    """Slow first pages (the read pool starting) do not drop a chain whose steady rate pays; a rate that
    stays slow past the warm-up does."""
    from tierserve.kv.tiers.cost import LoadPolicy, ReadWatch

    pb = 1 << 20
    # 5000 pages, recompute 6 s (warm-up 0.3 s): 10 pages in the first second, then 1000 pages/s
    w = ReadWatch(LoadPolicy(), pb, recompute=6.0, copy_in=0.5)
    assert w(10 * pb, 4990, 1.0)                        # past the warm-up: marked, not judged
    assert w(110 * pb, 4890, 1.1)                       # judged too early (0.1 s < warm-up): goes on
    # 1000 pages/s since the mark: the rest in 3.99 s + 0.5 s copy-in < 6 s. (The average since the start,
    # 505 pages/s, would have priced it at 8.4 s and dropped it.)
    assert w(1010 * pb, 3990, 2.0)
    assert not w.stopped
    pol = LoadPolicy()
    w = ReadWatch(pol, pb, recompute=6.0, copy_in=0.5)   # a disk that stays at 100 pages/s
    assert w(50 * pb, 4950, 0.5)
    assert not w(100 * pb, 4900, 1.0)                   # 49 s + 0.5 s > 6 s
    assert w.stopped and pol.decisions["stopped"] == 1
