"""`tierserve bench sparse-fp8 --smoke` on the CPU (tierserve-nano): every section's rows and fields, the skipped
rows that say why, the partial rows file and the plot; and the synthetic KV fill of section c on its own."""
import json
import time

import torch
from typer.testing import CliRunner

from tierserve.cli import app


def _one(rows, **kw):
    got = [r for r in rows if all(r.get(k) == v for k, v in kw.items())]
    assert len(got) == 1, (kw, rows)
    return got[0]


def test_bench_sparse_fp8_smoke(tmp_path):
    out = tmp_path / "sf.json"
    t = time.perf_counter()
    r = CliRunner().invoke(app, ["bench", "sparse-fp8", "--smoke", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t < 120          # < 60 s on an idle 2-core CPU; headroom for a shared one
    res = json.loads(out.read_text())
    assert res["meta"]["subcommand"] == "sparse-fp8" and res["meta"]["settings"]["sections"] == ["a", "b", "c"]
    rows = res["rows"]
    assert not [x for x in rows if "error" in x], rows
    for x in rows:                                  # a measurement or a reason, never neither
        assert ("tok_s" in x) != ("skipped" in x), x
        assert x["engine"] == "tierserve" and x["section"] in "abc" and "context" in x
        if "tok_s" in x:
            assert x["tok_s"] > 0 and x["attention_ms_per_step"] > 0 and x["batch"] == 1
            assert x["attention_ms_per_step"] == x["attention_ms_per_layer"] * 4      # nano: 4 layers
            assert x["attention_timing"] == "eager" and sum(x["step_kinds"].values()) > 0    # CPU: no graphs

    # a: BF16 and the three FP8 settings, each against BF16 in the same run
    bf16 = _one(rows, section="a", setting="bf16")
    assert bf16["context"] == 300 and bf16["new_tokens"] == 8 and "speedup_vs_bf16" not in bf16
    for name in ("fp8-weights+fp8-kv", "fp8-weights", "fp8-kv"):
        x = _one(rows, section="a", setting=name)
        assert x["speedup_vs_bf16"] == x["tok_s"] / bf16["tok_s"]
        assert 0 <= x["greedy_match_bf16"] <= 1
    assert _one(rows, section="a", setting="fp8-weights")["weight_bytes"] < bf16["weight_bytes"]
    assert _one(rows, section="a", setting="fp8-kv")["kv_read_bytes_per_step"] < bf16["kv_read_bytes_per_step"]

    # b: dense vs sparse (prefilled sparsely, decoded sparsely); sparse + FP8 KV (+ FP8 weights) too (stop 24)
    dense, sparse = _one(rows, section="b", setting="dense-bf16"), _one(rows, section="b", setting="sparse")
    assert sparse["sparse_topk_tokens"] == 96 and "sparse prefill" in sparse["kv_fill"] and sparse["prefill_s"] > 0
    full = _one(rows, section="b", setting="sparse+fp8-kv+fp8-weights")
    assert "sparse prefill" in full["kv_fill"] and full["weight_bytes"] < dense["weight_bytes"]
    assert sparse["speedup_vs_dense_bf16"] == sparse["tok_s"] / dense["tok_s"]
    assert sparse["attention_speedup_vs_dense_bf16"] > 0
    assert sparse["kv_read_bytes_per_step"] < dense["kv_read_bytes_per_step"]
    both = _one(rows, section="b", setting="sparse+fp8-kv")
    assert "tok_s" in both or "sparse_attention" in both["skipped"]
    head = _one(rows, section="b", setting="sparse+fp8-kv+fp8-weights+fp8-lm-head")          # opt-in row (stop 26)
    assert head["fp8_lm_head"] is True and head["tok_s"] > 0 and "sparse prefill" in head["kv_fill"]

    # c: real prefill over the tiers; a context whose CPU tier does not fit is skipped with the bytes, and the
    # largest power of two that fits is filled synthetically instead
    real = _one(rows, section="c", setting="tiered-sparse", context=300)
    assert real["gpu_pages"] < real["seq_pages"] and real["spilled_pages"] > 0
    big = _one(rows, section="c", setting="tiered-sparse", context=4096)
    assert "CPU tier needs" in big["skipped"] and "usable host RAM" in big["skipped"]
    fb = _one(rows, section="c", setting="tiered-sparse", context=2048)
    assert fb["fallback_for"] == 4096 and fb["kv_fill"].startswith("synthetic") and fb["fill_s"] > 0
    assert fb["spilled_pages"] > 0 and fb["gpu_share"] <= 0.11
    for x in (real, fb):       # untimed warm-up tokens (a multi-step window may make more than the 2 asked for) and
        # the window they left queued, then the rest timed (after the first token)
        assert x["decode_warmup_steps"] == 2 and x["decode_warmup_s"] > 0 and x["decode_warmup_tokens"] >= 2
        assert x["multi_step"] == 8 and x["timed_tokens"] > 0
        # (the step that computed the first token may have made a window already: <=)
        assert x["timed_tokens"] + x["decode_warmup_tokens"] + x.get("untimed_queued_tokens", 0) <= x["new_tokens"] + 1
    fp8 = _one(rows, section="c", setting="tiered-sparse+fp8-kv")      # FP8 pages spilled as compact rows
    assert "tok_s" in fp8 and fp8["spilled_pages"] > 0 and fp8["gpu_pages"] < fp8["seq_pages"]
    assert fp8["host_page_bytes"] < 0.6 * real["host_page_bytes"]
    fw = _one(rows, section="c", setting="tiered-sparse+fp8-kv+fp8-weights", context=300)    # + FP8 weights
    assert "tok_s" in fw and fw["spilled_pages"] > 0 and fw["weight_bytes"] < real["weight_bytes"]

    s = res["summary"]
    assert s["targets"]["a_speedup_vs_bf16"] == 1.8 and s["a_fp8-weights+fp8-kv_c300_speedup_vs_bf16"] > 0
    assert "b_best_speedup" in s and s["wall_s"] > 0
    partial = [json.loads(line) for line in (tmp_path / "sf.json.partial.jsonl").read_text().splitlines()]
    assert "run_start" in partial[0] and partial[1:] == json.loads(json.dumps(rows))
    assert (tmp_path / "sf.png").stat().st_size > 0


def _filled(**kw):
    """nano with a 512-token synthetic fill over a small pool and a CPU tier (sparse pages); the invariants
    checked. Returns (engine, request, page table)."""
    from tierserve import LLM
    from tierserve.bench.sparse_fp8_tiers import synthetic_prefill

    llm = LLM(None, device="cpu", max_model_len=600, cpu_kv_gb=0.01, sparse_attention="pages",
              sparse_topk_tokens=96, max_num_batched_tokens=64, enable_prefix_caching=False, max_num_seqs=1,
              debug_invariants=True, **kw)
    eng = llm.engine
    req = synthetic_prefill(eng, "s", 512, 4, 64, time.perf_counter() + 60, seed=0)
    eng.kv.check_invariants()
    eng.kv.tiers.check_invariants()
    return eng, req, eng.kv.page_table("s")


def test_synthetic_fill_spills_and_decodes():
    """The synthetic fill leaves a consistent engine: pages spilled to CPU RAM hold the random K/V and their
    key min/max rows, the accounting invariants hold, and the request decodes to the end."""
    eng, req, table = _filled(num_kv_pages=8)
    assert len(table) == 32 and sum(p < 0 for p in table) >= 24 and req.num_computed_tokens == 512
    host = eng.runner.host_kv[0][1]
    slot = -table[0] - 1
    k = host[slot, :, 0, :16]                                # [layers, 16 tokens, Hkv, D]
    assert k.abs().sum() > 0
    torch.testing.assert_close(host[slot, :, 0, 16], k.amin(1))
    torch.testing.assert_close(host[slot, :, 1, 16], k.amax(1))
    while eng.has_unfinished_requests():
        eng.step()
    assert len(req.output_token_ids) == 4


def test_synthetic_fill_fp8_spills_compact_rows_and_decodes():
    """The same with FP8 KV pages: the filled pages are quantised chunk by chunk and the oldest spill to CPU RAM
    as compact FP8 rows whose summary bytes are the device-resident summaries the sparse selector scores."""
    from tierserve.quant.fp8_compact import compact_summary

    eng, req, table = _filled(num_kv_pages=12, kv_dtype="fp8")
    assert len(table) == 32 and sum(p < 0 for p in table) >= 16 and req.num_computed_tokens == 512
    host = eng.runner.host_kv[0][1]
    assert host.dtype == torch.uint8
    data = eng.runner.kv.data
    h, d = data.shape[-2:]
    for p in table:
        if p < 0:
            summ = compact_summary(host[-p - 1], 1, h, d, 16, data.dtype)        # [layers, 2, 1, Hkv, D]
            assert summ.abs().sum() > 0
            assert torch.equal(eng.runner.spill.summaries[-p - 1], summ)
    while eng.has_unfinished_requests():
        eng.step()
    assert len(req.output_token_ids) == 4
    assert eng.kv.tiers.host.num_spilled == 0 and eng.kv.pool.num_in_use == 0


def test_summary_takes_the_best_tiered_setting_per_target_context():
    from tierserve.bench.sparse_fp8 import summarise

    rows = [{"section": "c", "setting": "tiered-sparse", "context": 131072, "tok_s": 43.0},
            {"section": "c", "setting": "tiered-sparse+fp8-kv+fp8-weights", "context": 131072, "tok_s": 125.0},
            {"section": "c", "setting": "tiered-sparse+fp8-kv", "context": 131072, "tok_s": 80.0},
            {"section": "c", "setting": "tiered-sparse+fp8-kv+fp8-weights", "context": 1048576, "tok_s": 40.0},
            {"section": "c", "setting": "tiered-sparse", "context": 1048576, "skipped": "host RAM"}]
    s = summarise(rows)
    assert s["c_best_tok_s_c131072"] == 125.0 and s["c_best_setting_c131072"] == "tiered-sparse+fp8-kv+fp8-weights"
    assert s["c_target_met_c131072"] is True and s["c_target_met_c1048576"] is False
    assert s["c_tiered-sparse_c131072_tok_s"] == 43.0


def test_page_size_reaches_every_engine_of_the_run(tmp_path, monkeypatch):
    """``--page-size`` and ``--sparse-page-spread`` (with --smoke too): every engine of the run, baselines included,
    gets them, and the pools are sized in pages of that many tokens."""
    from tierserve.bench import sparse_fp8_run

    built, spreads = [], []
    real = sparse_fp8_run.Bench.build

    def spy(self, **kw):
        llm, s = real(self, **kw)
        built.append((llm.engine.config.page_size, kw.get("num_kv_pages"), kw.get("max_model_len")))
        spreads.append(llm.engine.config.sparse_page_spread)
        return llm, s

    monkeypatch.setattr(sparse_fp8_run.Bench, "build", spy)
    out = tmp_path / "sf.json"
    r = CliRunner().invoke(app, ["bench", "sparse-fp8", "--smoke", "--sections", "b", "--page-size", "32",
                                 "--sparse-page-spread", "0.5", "--output", str(out), "--no-plot"])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert {x["setting"] for x in rows if "tok_s" in x} >= {"dense-bf16", "sparse"}
    assert built and all(ps == 32 for ps, _, _ in built)
    assert all(pages == -(-n // 32) + 4 for _, pages, n in built)
    assert json.loads(out.read_text())["meta"]["settings"]["sizes"]["page_size"] == 32
    assert spreads and all(x == 0.5 for x in spreads)
    assert json.loads(out.read_text())["meta"]["settings"]["sizes"]["page_spread"] == 0.5
