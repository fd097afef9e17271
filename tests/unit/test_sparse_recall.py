"""``bench sparse-recall`` (tierserve/bench/sparse_recall.py): the share of the dense attention mass inside the
selected pages, per layer -- 1 where the context fits the budget, in (0, 1] once pages are dropped, and the page
score option reaches the selector."""
import pytest

from tierserve.bench.sparse_recall import measure_recall


@pytest.mark.parametrize("spread,page", [(1.0, None), (0.5, 32)])
def test_recall_in_range_and_full_when_nothing_is_dropped(spread, page):
    text = " ".join(f"word{i % 97} and more text {i}" for i in range(400))
    res = measure_recall(None, text, [96, 1024], context=255, max_windows=1, page_spread=spread, page_size=page)
    assert res["meta"]["settings"]["page_spread"] == spread
    assert res["meta"]["settings"]["page_size"] == (page or 16)
    rows = res["rows"]
    sparse = [r for r in rows if r["topk_tokens"] == 96]
    assert sparse and all(0 < r["mass_recall"] <= 1 + 1e-6 and r["query_heads_measured"] > 0 for r in sparse)
    assert min(r["mass_recall"] for r in sparse) < 0.999          # pages really dropped
    wide = [r for r in rows if r["topk_tokens"] == 1024]          # no query's context exceeds the budget
    assert all(r["query_heads_measured"] == 0 for r in wide)
