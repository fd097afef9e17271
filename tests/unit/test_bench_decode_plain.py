"""bench decode's plain-path check: same engine and weights, graphs and multi-step off, then restored."""
from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM
from tierserve.bench.decode import DecodeCase, plain_tokens, run_tierserve


def test_plain_tokens_match_multi_step_and_restore_settings(tmp_path):
    llm = LLM(str(make_checkpoint(tmp_path / "m", "llama")), dtype="float32", device="cpu", max_model_len=128,
              num_kv_pages=64, page_size=8, num_scheduler_steps=4, enable_prefix_caching=False)
    eng = llm.engine
    case = DecodeCase(batch=2, context=20, new_tokens=12)
    prompts = [[0] + list(range(40, 59)), [0] + list(range(300, 319))]
    fast = run_tierserve(llm, case, prompts)["tokens"]
    plain = plain_tokens(llm, case, prompts, max_new=8)
    assert [len(t) for t in plain] == [8, 8]
    assert [t[:8] for t in fast] == plain
    assert eng.config.num_scheduler_steps == 4
