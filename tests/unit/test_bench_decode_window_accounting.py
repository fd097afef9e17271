"""``bench sparse-fp8``'s decode timing with multi-step windows: a window the warm-up left queued has run before the
timer starts, so its tokens are reported as untimed, not as timed tokens (stop 22's windowed section c rows
counted them)."""
from tests.helpers.tiny_models import make_checkpoint
from tierserve.bench.sparse_fp8 import SMOKE
from tierserve.bench.sparse_fp8_run import Bench


def test_window_queued_by_the_warm_up_is_not_timed(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama")
    bench = Bench(str(path), SMOKE, dict(dtype="float32", device="cpu"), 0, lambda row: None, lambda m: None)
    llm, _ = bench.build(max_model_len=160, num_scheduler_steps=4, enable_prefix_caching=False)
    eng = llm.engine
    req, _ = bench.prefill(eng, list(range(1, 40)), 1 + 3 + 16, float("inf"), dense=False)
    out = bench.decode(eng, req, float("inf"), attention=False, warmup_steps=3)
    queued = out.get("untimed_queued_tokens", 0)
    assert queued > 0                                   # the warm-up's first window queued the next one
    warm_made = 20 - 1 - out["timed_tokens"] - queued   # tokens made in the warm-up itself
    assert warm_made >= 3 and out["timed_tokens"] > 0


def test_a_setting_without_timed_tokens_is_a_skipped_row():
    """``Unmeasured`` (e.g. a request that finished in the decode warm-up) leaves a skipped row saying why, not an
    error and not a 'refused' one; the next setting still runs."""
    from tierserve.bench.sparse_fp8_run import Unmeasured

    rows = []
    b = Bench.__new__(Bench)
    b.emit = rows.append

    def one(name, setting, deadline):
        if name == "x":
            raise Unmeasured("decode: no timed token (3 made before the timer)")
        return {"tok_s": 1.0}
    b.run_settings("c", [("x", {}), ("y", {})], float("inf"), one)
    assert rows[0]["skipped"] == "decode: no timed token (3 made before the timer)" and "error" not in rows[0]
    assert rows[1]["tok_s"] == 1.0
