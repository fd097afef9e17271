"""Benchmark results record the TIERSERVE_* switches they ran with (bench/results.py)."""
from tierserve.bench.results import make_result, tierserve_env


def test_results_record_the_tierserve_switches_but_not_the_api_key(monkeypatch):
    monkeypatch.setenv("TIERSERVE_TOPK", "two-level")
    monkeypatch.setenv("TIERSERVE_API_KEY", "secret")
    monkeypatch.setenv("OTHER_SWITCH", "1")
    env = tierserve_env()
    assert env["TIERSERVE_TOPK"] == "two-level"
    assert "TIERSERVE_API_KEY" not in env and "OTHER_SWITCH" not in env
    assert make_result("tierserve bench", "x", {}, [], {})["meta"]["env"] == env
