"""`tierserve bench engram --smoke` on the CPU: every placement measured, identical greedy tokens across
placements, the summary, the partial rows file and the plot."""
import json

from typer.testing import CliRunner

from tierserve.bench.engram import engram_config, plan
from tierserve.cli import app


def test_engram_config_matches_requested_params():
    cfg, exact = engram_config((1, 15), 1e10, heads=8, dim=64)
    assert cfg.layers == (1, 15) and cfg.num_heads == 16
    assert 1e10 <= exact < 1.0001e10                  # distinct primes just above the requested rows
    names = [c["config"] for c in plan([1e9, 1e10], ("device", "cpu-copy", "cpu-zero_copy"), cuda=True)]
    assert names == ["none", "none-1step", "1B-device", "10B-device", "1B-cpu-copy", "10B-cpu-copy",
                     "1B-cpu-zero_copy", "10B-cpu-zero_copy"]


def test_bench_engram_smoke(tmp_path):
    out = tmp_path / "engram.json"
    r = CliRunner().invoke(app, ["bench", "engram", "--smoke", "--output", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["meta"]["subcommand"] == "engram" and res["meta"]["settings"]["engram_layers"] == [1, 2]
    rows = res["rows"]
    assert not [row for row in rows if "error" in row], rows
    done = [row for row in rows if "metric" in row]
    keys = {(row["config"], row["metric"], row["batch"]) for row in done}
    for cfg in ("none", "100K-device", "100K-cpu-copy", "400K-device", "400K-cpu-copy"):
        assert {(cfg, "decode", 1), (cfg, "decode", 4), (cfg, "prefill", 2)} <= keys, cfg
    assert all(row["tok_s"] > 0 for row in done)
    skipped = [row for row in rows if "skipped" in row]
    assert {row["config"] for row in skipped} == {"100K-cpu-zero_copy", "400K-cpu-zero_copy"}   # CUDA only
    by = {(row["config"], row["metric"], row["batch"]): row for row in done}
    for size in ("100K", "400K"):
        for metric, batch in (("decode", 1), ("decode", 4), ("prefill", 2)):
            dev, cpu = by[(f"{size}-device", metric, batch)], by[(f"{size}-cpu-copy", metric, batch)]
            assert dev["tokens_sha1"] == cpu["tokens_sha1"], (size, metric, batch)      # same greedy tokens
            assert dev["table_params"] == cpu["table_params"] > 0
            assert cpu["table_gpu_bytes"] == 0 and cpu["table_host_bytes"] == cpu["table_bytes"]
        s = res["summary"]["tables"][size]["cpu-copy"]
        assert s["greedy_tokens_match_device"] is True
        assert set(s["slowdown_pct"]) == {"decode_b1", "decode_b4", "prefill"}
    # Engram changes the output (the tables are read), so the backbone alone gives other tokens
    assert by[("none", "decode", 4)]["tokens_sha1"] != by[("100K-device", "decode", 4)]["tokens_sha1"]
    partial = [json.loads(line) for line in (tmp_path / "engram.json.partial.jsonl").read_text().splitlines()]
    assert "run_start" in partial[0] and len(partial) == len(rows) + 1
    assert (tmp_path / "engram.png").stat().st_size > 0
