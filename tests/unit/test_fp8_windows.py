"""FP8 KV with multi-step windows: storage keeps up with the read rule (engine/multi_step.py ``_fp8_aligned`` /
``_fp8_ahead``), so no decode step reads a page in FP8 that is still stored at full precision (the kernels' fix-up
branch, ~1.5x the decode launch on the H200 in stop 20), and the tokens stay those of single steps."""
import pytest
import torch

from tierserve.kv.fp8_pages import Fp8PagePolicy
from tierserve.quant.fp8_kv import fp8_read_mask


@pytest.mark.parametrize("ps,sink,recent", [(8, 4, 8), (16, 16, 64), (4, 0, 1), (8, 0, 0), (16, 5, 13)])
def test_steps_to_crossing_matches_the_read_rule(ps, sink, recent):
    pol = Fp8PagePolicy(ps, sink, recent)
    kv = torch.arange(400)
    for q in range(ps + recent, 300):
        d = pol.steps_to_crossing(q)
        assert 1 <= d <= ps
        reads = [fp8_read_mask(torch.tensor([p]), kv, ps, 0, recent)[0].sum().item() for p in range(q, q + d + 1)]
        assert len(set(reads[:d])) == 1, (q, d, reads)         # nothing new is read in FP8 inside the window
        assert reads[d] > reads[d - 1]                          # ... and the query after it reads one more page


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.helpers.tiny_models import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("fp8windows") / "llama", "llama")


def _run(ckpt, steps, storage, aligned=True, monkeypatch=None):
    from tierserve import LLM, SamplingParams
    from tierserve.engine import multi_step
    if not aligned:
        monkeypatch.setattr(multi_step.MultiStepDecoder, "_fp8_aligned", lambda self, k, q: k)
        monkeypatch.setattr(multi_step.MultiStepDecoder, "_fp8_ahead", lambda self, so, q: None)
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=160, num_kv_pages=60, page_size=8,
              max_num_batched_tokens=16,
              kv_dtype="fp8", kv_fp8_storage=storage, kv_fp8_keep_sink=4, kv_fp8_keep_recent=8, num_scheduler_steps=steps,
              enable_prefix_caching=False, max_num_seqs=1, debug_invariants=True)
    backend, lag = llm.engine.runner.backend, []
    real = backend.forward

    def check(q, k, v, kv_layer, meta, *a, **kw):
        f = meta.kv_fp8
        if f is not None and meta.decode_only:
            for b in range(meta.num_seqs):
                n = int(meta.seq_lens[b])
                pos = torch.arange(n)
                low = fp8_read_mask(torch.tensor([n - 1]), pos, f.page_size, f.keep_sink, f.keep_recent)[0]
                pages = meta.page_table[b, pos[low] // f.page_size].unique()
                lag.extend(int(p) for p in pages if not bool(f.flags(p)))
        return real(q, k, v, kv_layer, meta, *a, **kw)
    backend.forward = check
    prompt = [0] + [(7 * i + 3) % 500 + 3 for i in range(44)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0]
    assert (llm.engine.kv.compact is not None) == (storage == "compact")
    return out.outputs[0].token_ids, lag, dict(llm.engine.runner.step_kinds)


@pytest.mark.parametrize("storage", ["inplace", "compact"])
def test_windows_read_no_page_before_it_is_stored(ckpt, storage, monkeypatch):
    from tierserve.engine import multi_step
    single, lag1, _ = _run(ckpt, 1, storage)
    assert lag1 == []                                  # single steps: the commit after each step keeps up
    windows = []
    real = multi_step.MultiStepDecoder._fp8_aligned
    monkeypatch.setattr(multi_step.MultiStepDecoder, "_fp8_aligned",
                        lambda self, k, q: windows.append(real(self, k, q)) or windows[-1])
    aligned, lag, kinds = _run(ckpt, 4, storage)
    assert kinds.get("eager", 0) >= 40 and windows.count(4) >= 10           # the steps ran in windows of 4
    assert aligned == single
    assert lag == [], f"pages read in FP8 while stored at full precision: {lag}"
    unaligned, lag_old, _ = _run(ckpt, 4, storage, aligned=False, monkeypatch=monkeypatch)
    assert unaligned == single
    assert lag_old, "the check must see the lag of windows queued before the engine's commits"
