"""merge_sparse_fp8 (scripts/merge_sparse_fp8.py): whole sections of separate `bench sparse-fp8` runs in one result,
rows tagged with their source, the summary recomputed over the merged rows, a section given twice refused."""
import pytest

from tierserve.bench.results import make_result
from tierserve.bench.sparse_fp8 import merge_sparse_fp8


def _run(rows, env, sizes=None):
    r = make_result("tierserve bench", "sparse-fp8", {"model": "m", "sizes": sizes or {}}, rows, {"wall_s": 1.0})
    r["meta"]["env"] = env
    return r


def test_merge_keeps_sections_whole_tags_rows_and_recomputes_the_summary():
    a = _run([{"section": "a", "setting": "bf16", "context": 2048, "tok_s": 200.0},
              {"section": "a", "setting": "fp8-weights+fp8-kv", "context": 2048, "tok_s": 300.0,
               "speedup_vs_bf16": 1.5}], {"X": "1"})
    c = _run([{"section": "c", "setting": "tiered-sparse", "context": 131072, "tok_s": 121.0},
              {"section": "c", "setting": "tiered-sparse", "context": 1048576, "tok_s": 49.0}], {},
             {"page_size": 32, "page_spread": 0.5})
    m = merge_sparse_fp8([("a.json", a), ("c.json", c)])
    assert [r["source"] for r in m["rows"]] == ["a.json", "a.json", "c.json", "c.json"]
    assert m["rows"][0]["source_env"] == {"X": "1"}
    assert [s["sections"] for s in m["meta"]["sources"]] == [["a"], ["c"]]
    assert [(s["page_size"], s["page_spread"]) for s in m["meta"]["sources"]] == [(None, 1.0), (32, 0.5)]
    s = m["summary"]
    assert s["a_target_met"] is False and s["a_fp8-weights+fp8-kv_c2048_speedup_vs_bf16"] == 1.5
    assert s["c_target_met_c131072"] is True and s["c_target_met_c1048576"] is False


def test_merge_refuses_a_section_twice_and_other_results():
    a = _run([{"section": "a", "setting": "bf16", "context": 2048, "tok_s": 200.0}], {})
    with pytest.raises(ValueError, match="section a .* both x.json and y.json"):
        merge_sparse_fp8([("x.json", a), ("y.json", a)])
    other = make_result("tierserve bench", "decode", {}, [], {})
    with pytest.raises(ValueError, match="not a `bench sparse-fp8` result"):
        merge_sparse_fp8([("d.json", other)])
