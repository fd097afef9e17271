"""Continuous batching under load: 64 concurrent streams, 16 dropped by the client mid-stream; a dropped
non-streaming request; all pages come back. Plus a smoke run of `tierserve bench serving`."""
import asyncio
import importlib.util
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "64"]
KEEP, DROP = 24, 200          # max_tokens of the streams that finish / that the client drops


def metrics(server) -> dict[str, float]:
    """{'name' or 'name{label=value}': value} of the tierserve: samples."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in fam.samples:
            extra = {k: v for k, v in s.labels.items() if k not in ("model_name", "le")}
            key = s.name + ("{%s}" % ",".join(f"{k}={v}" for k, v in sorted(extra.items())) if extra else "")
            if "le" not in s.labels:
                out[key] = s.value
    return out


def wait_idle(server, timeout=10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if (m["tierserve:kv_blocks_used"] == 0 and m["tierserve:num_requests_running"] == 0
                and m["tierserve:num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


async def _one(client: httpx.AsyncClient, url: str, i: int, drop: bool) -> dict:
    body = {"prompt": f"request number {i}: " + "x " * (i % 7), "max_tokens": DROP if drop else KEEP,
            "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks, usage, finish = 0, None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj["choices"]:
                chunks += 1
                finish = c["finish_reason"] or finish
            if drop and chunks >= 3:
                break                           # leaving the block closes the connection mid-stream
    return {"drop": drop, "chunks": chunks, "usage": usage, "finish": finish}


def test_64_streams_16_dropped(server):
    before = metrics(server)

    async def run():
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_one(client, server.url, i, i % 4 == 0) for i in range(64)))

    results = asyncio.run(run())
    kept = [r for r in results if not r["drop"]]
    assert len(kept) == 48
    for r in kept:
        assert r["finish"] == "length" and r["usage"]["completion_tokens"] == KEEP, r
    m = wait_idle(server)
    assert m["tierserve:kv_blocks_used"] == 0
    aborted = m["tierserve:request_success_total{finished_reason=abort}"] - \
        before["tierserve:request_success_total{finished_reason=abort}"]
    assert aborted == 16
    done = m["tierserve:request_success_total{finished_reason=length}"] - \
        before["tierserve:request_success_total{finished_reason=length}"]
    assert done == 48
    generated = m["tierserve:generation_tokens_total"] - before["tierserve:generation_tokens_total"]
    assert 48 * KEEP + 16 * 3 <= generated < 48 * KEEP + 16 * DROP     # the dropped ones really stopped


def test_dropped_non_streaming_request_is_aborted(server):
    before = metrics(server)
    body = {"prompt": "long one", "max_tokens": DROP, "n": 16, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    m = wait_idle(server)
    assert m["tierserve:kv_blocks_used"] == 0
    assert m["tierserve:request_success_total{finished_reason=abort}"] == \
        before["tierserve:request_success_total{finished_reason=abort}"] + 1
    assert m["tierserve:generation_tokens_total"] - before["tierserve:generation_tokens_total"] < 16 * DROP


def test_bench_serving_smoke(server, tmp_path):
    from typer.testing import CliRunner

    from tierserve.bench.serving_cli import app

    out = tmp_path / "serving.json"
    res = CliRunner().invoke(app, ["--url", server.url, "--smoke", "--output", str(out)])   # model: the server's
    assert res.exit_code == 0, res.output
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "rows", "summary"}
    assert data["meta"]["tool"] == "bench" and data["meta"]["subcommand"] == "serving"
    assert data["meta"]["settings"]["model"] == server.model
    rows = data["rows"]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        assert r["completed"] == r["num_prompts"] and r["failed"] == 0
        assert r["output_tokens"] == r["num_prompts"] * data["meta"]["settings"]["output_len"]
        for k in ["request_throughput", "output_throughput", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                  "itl_p99_ms"]:
            assert r[k] > 0, k
    assert wait_idle(server)["tierserve:kv_blocks_used"] == 0
