"""Prometheus metrics, named like vLLM's with the prefix ``tierserve:``.

Gauges and engine counters are read from the engine when /metrics is scraped (no bookkeeping on the hot
path); per-request latencies arrive through the AsyncEngine's ``StatsListener`` hooks.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tierserve.engine.engine import Engine

P = "tierserve:"
disable_created_metrics()      # no *_created series (as vLLM)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


class _EngineCollector:
    """Reads the engine's own counters at scrape time."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.labels = engine, [model_name]

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(P + name, doc, labels=["model_name"])
        g.add_metric(self.labels, value)
        return g

    def _counter(self, name: str, doc: str, value: float, extra: dict[str, str] | None = None
                 ) -> CounterMetricFamily:
        extra = extra or {}
        c = CounterMetricFamily(P + name, doc, labels=["model_name", *extra])
        c.add_metric(self.labels + list(extra.values()), value)
        return c

    def collect(self):
        e = self.engine
        pool = e.kv.pool
        yield self._gauge("num_requests_running", "Requests scheduled in the running batch.",
                          len(e.scheduler.running))
        yield self._gauge("num_requests_waiting", "Requests waiting to be scheduled.", len(e.scheduler.waiting))
        yield self._gauge("kv_cache_usage_perc", "Fraction of KV pages in use (0 to 1).", pool.usage())
        yield self._gauge("kv_blocks_used", "KV pages referenced by a request.", pool.num_in_use)
        yield self._gauge("kv_blocks_total", "KV pages in the pool.", pool.num_pages)
        if e.kv.compact is not None:         # FP8 KV: quantised pages live in the compact pool
            cp = e.kv.compact.pool
            yield self._gauge("kv_fp8_compact_blocks_used", "FP8 compact KV pages referenced by a request.",
                              cp.num_in_use)
            yield self._gauge("kv_fp8_compact_blocks_total", "FP8 compact KV pages in the pool.", cp.num_pages)
        yield self._counter("prompt_tokens", "Prompt tokens admitted (n > 1 counts each sample).",
                            e.num_prompt_tokens)
        yield self._counter("generation_tokens", "Tokens generated.", e.num_generated_tokens)
        yield self._counter("prefix_cache_queries", "Prefix-cache lookups (one per admitted request).",
                            pool.queries)
        hits = CounterMetricFamily(P + "prefix_cache_hits", "Prefix-cache tokens served, by the tier "
                                   "that held them (gpu, cpu, disk, remote).", labels=["model_name", "tier"])
        for tier, n in e.kv.hit_tokens.items():
            hits.add_metric(self.labels + [tier], n)
        yield hits
        prefetcher = e.kv.tiers.prefetcher if e.kv.tiers is not None else None
        if prefetcher is not None:
            pf = CounterMetricFamily(P + "prefix_cache_prefetch", "Disk/remote prefix-cache pages served from a "
                                     "background read (hit) or read at admission (miss).",
                                     labels=["model_name", "result"])
            for result, key in (("hit", "hits"), ("miss", "misses")):
                pf.add_metric(self.labels + [result], prefetcher.counts[key])
            yield pf
        yield self._counter("num_preemptions", "Requests preempted (pages released, recomputed later).",
                            e.scheduler.num_preemptions)


class ServerMetrics:
    """Owns the registry; implements the AsyncEngine StatsListener hooks."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        lab = ["model_name"]
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between two outputs of one request.",
                             lab, buckets=ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to finish (or abort).", lab,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        success = Counter(P + "request_success", "Requests finished, by reason.", lab + ["finished_reason"],
                          registry=self.registry)
        self.success = {r: success.labels(model_name, r) for r in FINISH_REASONS}
        self.registry.register(_EngineCollector(engine, model_name))

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(self, reason: str, e2e_s: float) -> None:
        self.success.get(reason, self.success["abort"]).inc()
        self.e2e.observe(e2e_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
