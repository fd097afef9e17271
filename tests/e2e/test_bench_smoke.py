"""`tierserve bench ... --smoke` on the CPU: each writes the result JSON with its baseline rows."""
import json

from typer.testing import CliRunner

from tierserve.cli import app

runner = CliRunner()


def test_bench_decode_smoke(tmp_path):
    out = tmp_path / "decode.json"
    r = runner.invoke(app, ["bench", "decode", "--smoke", "--device", "cpu", "--output", str(out), "--no-plot"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    engines = {row["engine"] for row in res["rows"]}
    assert engines == {"tierserve", "transformers"}
    assert all(row["tok_s"] > 0 for row in res["rows"])
    assert all(row["greedy_match_transformers"].startswith(str(row["batch"])) for row in res["rows"]
               if row["engine"] == "tierserve")
    assert set(res["meta"]) >= {"tool", "subcommand", "settings", "versions", "device", "date"}
    assert all(0 < row["roofline_frac"] for row in res["rows"]) and res["summary"]["copy_bandwidth_GBps"] > 0
    # an untied embedding table is not read by a step: fewer bytes (nano's is tied: the same fraction)
    assert all(row["roofline_frac_bytes_read"] <= row["roofline_frac"] for row in res["rows"])


def test_untied_embedding_is_left_out_of_the_bytes_read():
    import torch.nn as nn

    from tierserve.bench.decode import untied_embedding_bytes

    m = nn.Module()
    m.embed_tokens, m.lm_head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    assert untied_embedding_bytes(m) == 10 * 4 * 4
    m.lm_head = None                              # tied: the table is the head, read every step
    assert untied_embedding_bytes(m) == 0


def test_bench_tiers_smoke(tmp_path):
    out = tmp_path / "tiers.json"
    r = runner.invoke(app, ["bench", "tiers", "--smoke", "--device", "cpu", "--output", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    ttft = {row["hit"]: row for row in res["rows"] if row["kind"] == "ttft"}
    served = {hit: row["served_by"] for hit, row in ttft.items()}
    assert served["cold"] == {} and "gpu" in served["gpu"] and "cpu" in served["cpu"] and "disk" in served["disk"]
    # the forced disk load and what the cost policy chose, with its two estimates, side by side
    pol = ttft["disk-policy"]
    assert pol["policy_choice"] in ("load", "recompute") and pol["est_load_s"] > 0 and pol["est_recompute_s"] > 0
    assert ttft["disk"]["disk_read_GBps"] > 0 and res["summary"]["disk_bandwidth_GBps"] > 0
    # the raw read of the very page files the hit read: all of the prompt's full pages
    assert ttft["disk"]["raw_files_bytes"] >= ttft["disk"]["disk_bytes"] > 0 and ttft["disk"]["raw_files_GBps"] > 0
    # every row was streamed as it came (a run killed by a time limit keeps them)
    lines = (tmp_path / "tiers.json.partial.jsonl").read_text().splitlines()
    assert len(lines) == 1 + len(res["rows"]) and (tmp_path / "tiers.png").exists()
    spill = [row for row in res["rows"] if row["kind"] == "decode" and row["gpu_frac"] < 1]
    assert spill and spill[0]["spilled_pages"] > 0
    # lossless: the run with pages in CPU RAM gives the all-GPU run's greedy tokens, and saves GPU memory
    assert all(row["tokens_equal_first_run"] for row in res["rows"] if row["kind"] == "decode")
    assert spill[0]["gpu_kv_saving"] > 0.3
    assert res["summary"]["host_to_device_GBps"] > 0
