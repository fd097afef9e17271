"""Multi-step decode windows over KV tiers (default; ``TIERSERVE_TIERED_MULTI_STEP=0`` turns them off; runner/multi_step.py): windows run
while the request's pages spill to CPU RAM (sparse "pages" attention, bf16 / FP8 pages; dense attention), with the
same greedy tokens as one step at a time; a window the path cannot serve is not queued."""
import pytest

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.runner import multi_step

PROMPT = [0] + [(7 * i + 3) % 500 + 3 for i in range(150)]       # 151 tokens
SP = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiered_ms") / "llama", "llama")


def run(ckpt, steps, **kw):
    kw = dict(dict(dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=16,
                   enable_prefix_caching=False, cpu_kv_gb=0.01, debug_invariants=True), **kw)
    llm = LLM(str(ckpt), num_scheduler_steps=steps, **kw)
    runner, calls = llm.engine.runner, {"launch": 0, "extend": 0, "refused": 0, "over_host": 0}
    launch, extend = runner.launch_multi, runner.extend_multi

    def count_launch(*a, **k):
        out = launch(*a, **k)
        calls["launch"] += 1
        calls["over_host"] += out.meta.host_kv is not None        # the window reads pages in CPU RAM
        return out

    def count_extend(*a, **k):
        out = extend(*a, **k)
        calls["extend" if out is not None else "refused"] += 1
        if out is not None:
            calls["over_host"] += out.meta.host_kv is not None
        return out
    runner.launch_multi, runner.extend_multi = count_launch, count_extend
    toks = llm.generate([PROMPT], SP)[0].outputs[0].token_ids
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.num_requests == 0 and kv.pool.num_in_use == 0 and kv.tiers.host.num_spilled == 0
    return toks, calls, kv.num_spilled


CASES = {
    "sparse": dict(sparse_attention="pages", sparse_topk_tokens=96, num_kv_pages=10),
    "sparse-fp8": dict(sparse_attention="pages", sparse_topk_tokens=96, num_kv_pages=10, kv_dtype="fp8",
                       kv_fp8_keep_sink=4, kv_fp8_keep_recent=16),
    "dense": dict(num_kv_pages=8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_windows_over_spilled_pages_give_the_one_step_tokens(ckpt, monkeypatch, case):
    one, calls_one, spilled_one = run(ckpt, 1, **CASES[case])
    assert calls_one["launch"] == 0 and spilled_one > 0
    monkeypatch.setattr(multi_step, "TIERED", False)             # off: tiers decode step by step
    off, calls_off, _ = run(ckpt, 4, **CASES[case])
    assert calls_off["launch"] == 0 and off == one
    monkeypatch.setattr(multi_step, "TIERED", True)
    got, calls, spilled = run(ckpt, 4, **CASES[case])
    assert got == one and spilled > 0 and calls["launch"] > 0
    assert calls["extend"] > 0 and calls["over_host"] > 0        # windows queued back to back over spilled pages


@pytest.mark.parametrize("case", ["sparse", "sparse-fp8"])
def test_placement_inside_a_queue_of_windows(ckpt, monkeypatch, case):
    """Pages are promoted and demoted between windows of one queue (from the counts' snapshot; the queue does not
    end for it), with the one-step tokens. The counts are rigged before each snapshot -- device pages never chosen,
    spilled ones chosen twice more -- so that pages move at every window (in this tiny model every page is chosen
    about as often as any other, and little would move); placement changes where pages are read, never what."""
    from tierserve.engine import multi_step as engine_multi
    from tierserve.kv.spill_placement import SpillPlacement
    from tierserve.runner.spill_state import SpillState

    snapshot = SpillState.snapshot

    def cold_device(self):
        self.page_heat.zero_()
        self.host_heat += 2
        snapshot(self)
    monkeypatch.setattr(SpillState, "snapshot", cold_device)

    monkeypatch.setattr(multi_step, "TIERED", True)
    monkeypatch.setattr(engine_multi, "MOVES_IN_QUEUE", True)
    monkeypatch.setattr(SpillPlacement, "rebalance_every", 1)
    in_queue = []
    real = engine_multi.MultiStepDecoder._placement

    def placement(self):
        spill = real(self)
        in_queue.append(spill is not None)
        return spill
    monkeypatch.setattr(engine_multi.MultiStepDecoder, "_placement", placement)
    moves = {"promoted": 0, "demoted": 0}
    rebalance = SpillPlacement.rebalance

    def counted(self, *a, **k):
        p, d = self.num_promoted, self.num_demoted
        rebalance(self, *a, **k)
        if in_queue and in_queue[-1]:
            moves["promoted"] += self.num_promoted - p
            moves["demoted"] += self.num_demoted - d
    monkeypatch.setattr(SpillPlacement, "rebalance", counted)
    kw = dict(CASES[case], cpu_kv_gb=0.1)          # room in CPU RAM for the demoted pages
    if case == "sparse-fp8":                        # compact FP8 storage demotes nothing (hot pages come back
        kw["kv_fp8_storage"] = "inplace"            # into compact slots)
    got, calls, spilled = run(ckpt, 4, **kw)
    monkeypatch.undo()
    one, _, _ = run(ckpt, 1, **kw)
    assert got == one and spilled > 0 and calls["extend"] > 0
    assert sum(in_queue) > 0 and moves["promoted"] > 0 and moves["demoted"] > 0, (in_queue, moves)
