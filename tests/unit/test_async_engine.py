"""AsyncEngine: one loop drives the Engine for concurrent callers; adds and aborts are applied between steps."""
import asyncio

import pytest

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.config import EngineConfig
from tierserve.engine.async_engine import AsyncEngine, EngineDeadError
from tierserve.engine.engine import Engine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["hello world", "the quick brown fox", "a", "some longer prompt with several words in it"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="module")
def reference(ckpt):
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=128)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def engine(ckpt) -> Engine:
    return Engine(EngineConfig(model=str(ckpt), dtype="float32", device="cpu", max_model_len=128))


class Recorder:
    def __init__(self):
        self.ttft, self.itl, self.finished = [], [], []

    def on_first_token(self, s):
        self.ttft.append(s)

    def on_token(self, s):
        self.itl.append(s)

    def on_finished(self, reason, s):
        self.finished.append(reason)


def run(coro_fn, ckpt, listener=None):
    """Run ``coro_fn(async_engine)`` with a started loop; shut it down afterwards."""
    eng = engine(ckpt)

    async def main():
        ae = AsyncEngine(eng, listener)
        ae.start()
        try:
            return await coro_fn(ae)
        finally:
            await ae.shutdown()

    return eng, asyncio.run(main())


def assert_idle(eng: Engine):
    eng.kv.check_invariants()
    assert eng.kv.pool.num_in_use == 0 and not eng.requests and not eng.has_unfinished_requests()


async def final(ae, rid, prompt, params):
    last = None
    async for out in ae.generate(rid, prompt, params):
        last = out
    return last


def test_concurrent_greedy_equals_llm_generate(ckpt, reference):
    rec = Recorder()

    async def go(ae):
        return await asyncio.gather(*(final(ae, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))

    eng, outs = run(go, ckpt, rec)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert_idle(eng)
    assert len(rec.ttft) == len(PROMPTS) and rec.finished == ["length"] * len(PROMPTS)
    assert len(rec.itl) == len(PROMPTS) * (GREEDY.max_tokens - 1)


def test_bad_prompt_raises_before_output(ckpt):
    async def go(ae):
        with pytest.raises(ValueError, match="max_model_len"):
            await ae.add_request("long", list(range(3, 200)), GREEDY)
        with pytest.raises(ValueError, match="vocabulary"):
            await ae.add_request("vocab", [10**6], GREEDY)
        return await final(ae, "ok", "fine", GREEDY)        # the loop keeps serving

    eng, out = run(go, ckpt)
    assert out.finished
    assert_idle(eng)


def test_leaving_a_stream_aborts_and_frees_pages(ckpt):
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    rec = Recorder()

    async def go(ae):
        seen = 0
        async for _ in ae.generate("a", "hello", long):
            seen += 1
            assert ae.engine.kv.pool.num_in_use > 0
            if seen == 3:
                break
        # a consumer task cancelled while waiting aborts too (cancelled once its first token arrived: a fixed
        # sleep let the tiny model finish all 100 tokens on an idle CPU)
        started = asyncio.Event()

        async def consume():
            async for _ in ae.generate("b", "hello again", long):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        other = await final(ae, "c", "short", GREEDY)       # runs after the aborts were applied
        return seen, other, ae.num_in_flight

    eng, (seen, other, in_flight) = run(go, ckpt, rec)
    assert seen == 3 and other.finished and in_flight == 0
    assert eng.num_generated_tokens < 100
    assert sorted(rec.finished) == ["abort", "abort", "length"]
    assert_idle(eng)


def test_reader_that_starts_after_the_finish_gets_the_output(ckpt):
    async def go(ae):
        handle = await ae.add_request("quick", "hello", SamplingParams(temperature=0, max_tokens=1))
        for _ in range(100):                                   # let it finish before anyone reads
            if ae.num_in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert ae.num_in_flight == 0
        return [out async for out in ae.stream(handle)]

    eng, outs = run(go, ckpt)
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 1
    assert_idle(eng)


def test_n_samples_aggregated(ckpt):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)

    async def go(ae):
        return await final(ae, "multi", "hello", params)

    eng, out = run(go, ckpt)
    assert out.request_id == "multi" and [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert_idle(eng)


def test_duplicate_id_and_shutdown(ckpt):
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    eng = engine(ckpt)

    async def main():
        ae = AsyncEngine(eng)
        ae.start()
        await ae.add_request("x", "hello", long)
        with pytest.raises(ValueError, match="in use"):
            await ae.add_request("x", "hello", long)
        stream = ae.stream("x")
        await stream.__anext__()
        await ae.shutdown()                                  # aborts what is in flight
        with pytest.raises(EngineDeadError):
            await stream.__anext__()
        with pytest.raises(EngineDeadError):
            await ae.add_request("y", "hello", long)

    asyncio.run(main())
    assert_idle(eng)


def test_failed_step_fails_requests_and_loop_survives(ckpt, monkeypatch):
    async def go(ae):
        real = ae.engine.step
        calls = {"n": 0}

        def flaky():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real()

        monkeypatch.setattr(ae.engine, "step", flaky)
        with pytest.raises(EngineDeadError, match="boom"):
            await final(ae, "bad", "hello", GREEDY)
        return await final(ae, "good", "hello", GREEDY)

    eng, out = run(go, ckpt)
    assert out.finished and len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert_idle(eng)
