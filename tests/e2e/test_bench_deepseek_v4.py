"""`tierserve bench deepseek-v4`: the --smoke run on the CPU (tiny V4 with the shipped config's layer types, both
engines, greedy tokens equal), transformers' model filled from ours (same logits), and the out-of-memory /
time-budget rows."""
import json
import time

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers.tiny_deepseek_v4 import one_thread  # noqa: F401
from tierserve.bench import deepseek_v4 as bench
from tierserve.cli import app

HCA, CSA = bench.HCA, bench.CSA


def test_config_keeps_the_first_layers_types():
    cfg = bench.bench_config("deepseek-v4-flash", 4, smoke=False)
    assert cfg["num_hidden_layers"] == 4 and cfg["hidden_size"] == 4096 and cfg["n_routed_experts"] == 256
    assert cfg["layer_types"] == [HCA, HCA, HCA, CSA]
    assert cfg["mlp_layer_types"] == ["hash_moe", "hash_moe", "hash_moe", "moe"]
    from tierserve.models.deepseek_v4.config import DeepseekV4Config
    from tierserve.models.deepseek_v4.model import DeepseekV4Model

    with torch.device("meta"):
        m = DeepseekV4Model(DeepseekV4Config.from_hf(cfg))
    assert round(sum(p.numel() for p in m.parameters()) / 1e9, 1) == 27.4     # the 27.4B
    with pytest.raises(ValueError, match="--layers"):
        bench.bench_config(None, 44, smoke=False)


def test_transformers_filled_from_ours_gives_the_same_logits():
    import transformers

    from tierserve.models.deepseek_v4.config import DeepseekV4Config
    from tierserve.models.deepseek_v4.dummy import random_deepseek_v4

    cfg = bench.bench_config(None, 4, smoke=True)
    ours = random_deepseek_v4(DeepseekV4Config.from_hf(cfg), 0, torch.float32, torch.device("cpu"))
    with torch.no_grad():                    # larger weights than the dummy's: logits far from ties
        for p in ours.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV4Config(**cfg), dtype=torch.float32)
    assert bench.copy_into_hf(ours, hf) == len([n for n, _ in [*hf.named_parameters(), *hf.named_buffers()]
                                                if "rotary_emb" not in n])
    ids = torch.randint(3, 128, (1, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    assert torch.allclose(ours.forward_full(ids[0]), ref, atol=1e-4)
    bench._free(ours)
    assert all(p.numel() == 0 for p in ours.parameters())


def test_bench_deepseek_v4_smoke(tmp_path):
    out = tmp_path / "v4.json"
    t = time.perf_counter()
    r = CliRunner().invoke(app, ["bench", "deepseek-v4", "--smoke", "--cpu-experts", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t < 120          # < 60 s on an idle 2-core CPU; headroom for a shared one
    res = json.loads(out.read_text())
    s = res["meta"]["settings"]
    assert res["meta"]["subcommand"] == "deepseek-v4" and s["layers"] == 4 and s["contexts"] == [16, 40, 100]
    assert s["layer_types"] == [HCA, HCA, HCA, CSA] and s["mlp_layer_types"][0] == "hash_moe"
    rows, cpu = res["rows"][:-1], res["rows"][-1]
    assert [(x["engine"], x["context"]) for x in rows] == [(e, c) for e in ("tierserve", "transformers")
                                                          for c in (16, 40, 100)]
    # --cpu-experts: one more row at the first context, with the routed experts placed on the host
    assert cpu["engine"] == "tierserve-cpu-experts" and cpu["context"] == 16 and cpu["cpu_experts"] and cpu["tok_s"] > 0
    assert res["summary"]["cpu_experts_over_device_c16"] == cpu["tok_s"] / rows[0]["tok_s"]
    for x in rows:
        assert x["tok_s"] > 0 and x["ttft_s"] > 0 and x["batch"] == 1 and x["new_tokens"] == 8, x
    for x in rows[:3]:
        assert x["cuda_graphs"] is False and x["graph_replays"] == 0      # CPU: no graphs
        assert x["state_bytes"] > 0 and x["state_bytes_per_token"] == x["state_bytes"] / x["context"]
        assert x["state_bytes"] <= x["state_bytes_at_context"] and x["roofline_frac"] > 0
        assert x["llama_kv_ratio"] == 131072 / x["state_bytes_per_token"]
    for x in rows[3:]:
        assert x["greedy_equal"] and x["greedy_match_tierserve"] == "8/8 leading tokens", x
    sm = res["summary"]
    assert sm["tierserve_cuda_graphs"] is False
    assert sm["llama_3_1_8b_kv_bytes_per_token"] == 131072 and sm["state_bytes_per_token_bf16_this_model"] > 0
    assert sm["speedup_c16"] == rows[0]["tok_s"] / rows[3]["tok_s"] and sm["targets"]["tierserve_runs_every_context"]
    assert set(sm["targets"]) == {"speedup_ge_5x_at_c16", "tierserve_runs_every_context", "decode_c100_ge_half_of_c16"}
    partial = [json.loads(line) for line in (tmp_path / "v4.json.partial.jsonl").read_text().splitlines()]
    assert "run_start" in partial[0] and partial[1:] == res["rows"]
    assert out.with_suffix(".png").stat().st_size > 0
    # a stopped run's file rebuilds the same summary (less the graph replay time, which is not in the rows)
    from tierserve.bench.deepseek_v4 import result_from_partial
    again = result_from_partial(tmp_path / "v4.json.partial.jsonl", device="elsewhere")
    assert again["rows"] == res["rows"] and again["meta"]["device"] == "elsewhere"
    assert again["summary"] == {k: v for k, v in sm.items() if k in again["summary"]}
    assert set(sm) - set(again["summary"]) <= {"graph_replay_ms_batch1", "params", "weight_bytes",
                                               "copy_bandwidth_GBps", "wall_s"}


def test_out_of_memory_and_time_budget_rows(tmp_path, monkeypatch):
    real = bench.run_transformers

    def fake(model, case, prompts):
        if case.context >= 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 516.00 GiB.\nmore text")
        return real(model, case, prompts)
    monkeypatch.setattr(bench, "run_transformers", fake)
    res = bench.bench_deepseek_v4(None, [16, 40, 100], new_tokens=4, chunk=32, device="cpu", smoke=True,
                                  ours_budget_s=0.0, partial_path=tmp_path / "p.jsonl", log=lambda *a: None)
    by = {(x["engine"], x["context"]): x for x in res["rows"]}
    for c in (16, 40, 100):          # the deadline passed before the first prefill step: stopped, with where
        assert "tok_s" not in by["tierserve", c] and by["tierserve", c]["skipped"].startswith("time budget: stopped")
        assert by["tierserve", c]["skipped"].endswith(f"prefill at 0/{c} tokens")
    assert by["transformers", 16]["tok_s"] > 0 and "greedy_equal" not in by["transformers", 16]
    assert by["transformers", 40]["out_of_memory"] == "CUDA out of memory. Tried to allocate 516.00 GiB."
    assert by["transformers", 100]["skipped"] == "ran out of memory at context 40 already"
    t = res["summary"]["targets"]
    assert not any(t.values()) and "speedup_c16" not in res["summary"]
