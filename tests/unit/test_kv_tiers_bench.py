"""`bench tiers` plumbing on the CPU without a model: the time budget, the partial-rows file, the summary."""
import json

from tierserve.bench.results import row_emitter
from tierserve.bench.tiers import result_from_partial, summarize
from tierserve.bench.tiers_io import Budget, disk_bandwidth


def test_budget_skip_says_why():
    b = Budget(100.0)
    assert b.skip(10, "x") is None
    why = b.skip(90, "the 131072-token TTFT cases", reserve=20)
    assert why.startswith("time budget:") and "131072" in why and "kept for later" in why


def test_partial_rows_rebuild_a_result(tmp_path):
    part = tmp_path / "t.json.partial.jsonl"
    rows: list = []
    emit = row_emitter(rows, {"contexts": [64]}, part)
    emit({"kind": "bandwidth", "disk_bandwidth_GBps": 2.0})
    emit({"kind": "ttft", "context": 64, "hit": "cold", "ttft_s": 2.0, "served_by": {}})
    emit({"kind": "ttft", "context": 64, "hit": "disk", "ttft_s": 1.0, "served_by": {"disk": 48},
          "disk_read_GBps": 1.6})
    emit({"kind": "ttft", "context": 64, "hit": "disk-policy", "ttft_s": 1.0, "policy_choice": "load",
          "right_choice": True, "served_by": {"disk": 48}})
    emit({"kind": "decode", "engine": "tierserve", "context": 64, "gpu_frac": 0.5, "skipped": "time budget"})
    res = result_from_partial(part)
    assert res["rows"] == rows and res["meta"]["settings"] == {"contexts": [64]} and "partial" in res["meta"]["status"]
    s = summarize(rows)
    assert s["ttft_disk_over_cold_c64"] == 0.5 and s["disk_read_over_bandwidth_c64"] == 0.8
    assert s["policy_choice_c64"] == "load" and s["skipped"] == 1
    json.dumps(res)


def test_disk_bandwidth_of_a_fresh_file(tmp_path):
    out = disk_bandwidth(str(tmp_path), 8 << 20, workers=2)
    assert out["disk_bandwidth_GBps"] > 0 and out["disk_bandwidth_file_bytes"] == 8 << 20
    assert not list(tmp_path.iterdir())                       # the file is removed


def test_transformers_timed_generate_stamps_each_step(tmp_path):
    """One generate gives the baseline's TTFT (first stamp) and decode rate (the rest)."""
    import torch
    import transformers

    from tests.helpers.tiny_models import make_checkpoint
    from tierserve.bench.tiers_hf import timed_generate

    hf = transformers.AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "llama", "llama")).eval()
    r = timed_generate(hf, torch.randint(3, 200, (1, 40)), 5)
    assert r["decode_tokens"] == 4 and r["ttft_s"] > 0 and r["tok_s"] > 0
