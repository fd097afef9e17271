"""Serving benchmark: an async load generator (httpx) against any OpenAI-compatible /v1/completions.

For each concurrency level it sends ``num_prompts`` streaming requests of ``input_len`` prompt tokens and
``output_len`` new tokens (``ignore_eos``), arriving as a Poisson process of ``request_rate`` requests/s
(``inf``: all at once) with at most ``concurrency`` in flight (``num_prompts`` 0: max(32, 4 x concurrency)
per level), and reports request throughput, output
tokens/s, TTFT and inter-token latency (ITL) percentiles. The result has the shape of every tierserve
result file: ``{"meta": {...}, "rows": [...], "summary": {...}}``.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx

from tierserve.bench.plot import save_figure
from tierserve.bench.results import make_result

# Prompts are built from the server's own tokenization of this text, so they have exactly input_len tokens.
_CORPUS = ("The quick brown fox jumps over the lazy dog. Serving many requests at once is a matter of "
           "batching: every step, each running request computes its next token, while new prompts are "
           "prefilled in chunks. 0123456789 alpha beta gamma delta epsilon zeta eta theta iota kappa lambda")


@dataclass
class _Result:
    ok: bool = False
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""


async def _vocab_sample(client: httpx.AsyncClient, url: str, model: str) -> list[int] | None:
    try:
        r = await client.post(f"{url}/tokenize", json={"model": model, "prompt": _CORPUS,
                                                       "add_special_tokens": False})
        ids = sorted(set(r.json()["tokens"])) if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError):
        ids = []
    return ids or None


def _prompts(vocab: list[int] | None, n: int, input_len: int, rng: random.Random) -> list:
    if vocab is None:     # no /tokenize: text prompts of about input_len words
        words = _CORPUS.split()
        return [" ".join(rng.choice(words) for _ in range(input_len)) for _ in range(n)]
    if len(vocab) < 32:   # a stand-in tokenizer (random-weight model) knows none of the corpus: random ids
        vocab = range(1, 32000)
    return [[rng.choice(vocab) for _ in range(input_len)] for _ in range(n)]


async def _request(client: httpx.AsyncClient, url: str, model: str, prompt, output_len: int) -> _Result:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res = _Result()
    t0 = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                if not obj.get("choices"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - t0
                else:
                    res.itls.append(now - last)
                last, chunks = now, chunks + 1
        res.latency = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    i = (len(s) - 1) * q / 100
    lo, hi = math.floor(i), math.ceil(i)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


async def _level(client, url, model, prompts, concurrency, output_len, request_rate, rng) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def limited(p):
        async with sem:
            return await _request(client, url, model, p, output_len)

    t0 = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(limited(p)))
        if math.isfinite(request_rate) and request_rate > 0:
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    dur = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r.itls]
    e2e = [r.latency * 1e3 for r in ok]
    out_tok = sum(r.output_tokens for r in ok)
    return {"engine": "tierserve", "setting": f"concurrency={concurrency}", "concurrency": concurrency,
            "num_prompts": len(prompts), "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:3], "duration_s": dur,
            "request_throughput": len(ok) / dur, "output_throughput": out_tok / dur, "output_tokens": out_tok,
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99), "itl_p50_ms": _pct(itl, 50),
            "itl_p99_ms": _pct(itl, 99), "e2e_p50_ms": _pct(e2e, 50), "e2e_p99_ms": _pct(e2e, 99)}


async def run_serving_bench_async(url: str, model: str | None, concurrency_list: Sequence[int], input_len: int,
                                  output_len: int, num_prompts: int, request_rate: float = math.inf,
                                  seed: int = 0, api_key: str | None = None, timeout: float = 600.0) -> dict:
    url = url.rstrip("/").removesuffix("/v1")
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency_list) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        server = {}
        try:
            server["model"] = (await client.get(f"{url}/v1/models")).json()["data"][0]
            server["version"] = (await client.get(f"{url}/version")).json().get("version")
        except (httpx.HTTPError, ValueError, KeyError, IndexError, AttributeError):
            pass
        if model is None:
            if "model" not in server:
                raise RuntimeError(f"could not list the models of {url}; pass the model name")
            model = server["model"]["id"]
        vocab = await _vocab_sample(client, url, model)
        warm = await _request(client, url, model, _prompts(vocab, 1, input_len, rng)[0], min(output_len, 4))
        if not warm.ok:
            raise RuntimeError(f"warm-up request to {url} failed: {warm.error}")
        rows = []
        for c in concurrency_list:
            prompts = _prompts(vocab, num_prompts or max(32, 4 * c), input_len, rng)
            rows.append(await _level(client, url, model, prompts, c, output_len, request_rate, rng))
    best = max(rows, key=lambda r: r["output_throughput"])
    settings = {"url": url, "model": model, "concurrency": list(concurrency_list), "input_len": input_len,
                "output_len": output_len, "num_prompts": num_prompts or "max(32, 4 x concurrency)",
                "request_rate": request_rate if math.isfinite(request_rate) else "inf", "seed": seed}
    result = make_result("bench", "serving", settings, rows, {})
    result["meta"]["server"] = server            # the client's device; the server reports its own version
    summary = {"max_output_throughput": best["output_throughput"], "best_concurrency": best["concurrency"],
               "max_request_throughput": max(r["request_throughput"] for r in rows),
               "ttft_p50_ms_at_lowest_concurrency": rows[0]["ttft_p50_ms"],
               "itl_p50_ms_at_lowest_concurrency": rows[0]["itl_p50_ms"],
               "failed": sum(r["failed"] for r in rows)}
    result["summary"] = summary
    return result


def run_serving_bench(url: str, model: str | None, concurrency_list: Sequence[int], input_len: int, output_len: int,
                      num_prompts: int, request_rate: float = math.inf, seed: int = 0, **kw) -> dict:
    """Blocking wrapper of :func:`run_serving_bench_async` (call that one from inside an event loop)."""
    return asyncio.run(run_serving_bench_async(url, model, concurrency_list, input_len, output_len, num_prompts,
                                               request_rate, seed, **kw))


def plot_serving(result: dict, path: str | Path) -> Path | None:
    """Output tok/s and TTFT / ITL percentiles against concurrency, as a PNG. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    c = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ax[0].plot(c, [r["output_throughput"] for r in rows], "o-")
    ax[0].set_ylabel("output tokens / s")
    for r in rows:
        ax[0].annotate(f"{r['request_throughput']:.3g} req/s", (r["concurrency"], r["output_throughput"]),
                       textcoords="offset points", xytext=(4, -12), fontsize=8)
    for i, key in ((1, "ttft"), (2, "itl")):
        ax[i].plot(c, [r[f"{key}_p50_ms"] for r in rows], "o-", label="p50")
        ax[i].plot(c, [r[f"{key}_p99_ms"] for r in rows], "s--", label="p99")
        ax[i].set_ylabel(f"{key.upper()} (ms)")
        ax[i].legend()
    s = result["meta"]["settings"]
    for a, title in zip(ax, ("throughput", "time to first token", "inter-token latency")):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrency")
        a.set_title(title)
        a.grid(alpha=0.3)
    return save_figure(fig, path, f"tierserve serving: {s['model']}, in {s['input_len']} / out {s['output_len']} "
                                  f"tokens, rate {s['request_rate']} req/s ({result['meta']['date']})")
