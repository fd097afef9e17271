"""The recompute side of the load-vs-recompute decision: how long a prefill of N tokens takes.

A prefill step of n tokens whose token i attends to c_i earlier tokens costs about a*n + b*sum(c_i): the
per-token work (weights, MLP) plus attention, which grows with the context. Samples are engine steps
with a prefill of >= ``MIN_TOKENS`` tokens; the model is a least-squares fit of the time per token
against the mean context per token (weighted by the step's tokens), a, b >= 0. Recomputing a prefix of N
tokens from position 0 is then estimated as a*N + b*N*(N+1)/2, so a long hit is not priced at the
per-token cost of short chunks (nor a short one at that of long chunks).

Compilation lands in the first steps of each new shape and makes them slower, never faster: samples
more than ``OUTLIER`` times slower than the fit of the others are dropped (one at a time, worst first),
so a compile-time step does not price every later hit. With fewer than three samples the fastest
per-token rate observed is used.
"""
from __future__ import annotations

from collections import deque

MIN_TOKENS = 32
OUTLIER = 2.0


class PrefillCost:
    def __init__(self, keep: int = 64) -> None:
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=keep)   # (tokens, mean context, s/token)
        self.a: float | None = None           # seconds per token
        self.b = 0.0                          # seconds per token per token of context

    @property
    def measured(self) -> bool:
        return self.a is not None

    def set_flat(self, seconds_per_token: float | None) -> None:
        """A fixed cost per token (tests, a known rate); the fit restarts from the next sample."""
        self.samples.clear()
        self.a, self.b = seconds_per_token, 0.0

    def observe(self, num_tokens: int, seconds: float, attended: int | None = None) -> None:
        """One prefill step: ``num_tokens`` computed in ``seconds``; ``attended``: the sum over those tokens
        of the tokens each attends to (None: unknown, taken as 0)."""
        if num_tokens < MIN_TOKENS or seconds <= 0:
            return
        ctx = (attended or 0) / num_tokens
        self.samples.append((float(num_tokens), ctx, seconds / num_tokens))
        self._fit()

    def _fit(self) -> None:
        pts = list(self.samples)
        if len(pts) < 3:
            self.a, self.b = min(y for _, _, y in pts), 0.0
            return
        while True:
            a, b = _wls(pts)
            worst = max(range(len(pts)), key=lambda i: pts[i][2] / max(a + b * pts[i][1], 1e-30))
            if len(pts) <= 2 or pts[worst][2] <= OUTLIER * (a + b * pts[worst][1]):
                break
            pts.pop(worst)
        self.a, self.b = a, b

    def per_token(self, context: float = 0.0) -> float | None:
        return None if self.a is None else self.a + self.b * context

    def estimate(self, num_tokens: int, start: int = 0) -> float | None:
        """Seconds to prefill tokens [start, start + num_tokens) of a sequence (None: not measured yet)."""
        if self.a is None:
            return None
        n = num_tokens
        return self.a * n + self.b * (n * start + n * (n + 1) / 2)


def _wls(pts: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Weighted least squares y = a + b x (weights w), with a, b >= 0."""
    sw = sum(w for w, _, _ in pts)
    mx = sum(w * x for w, x, _ in pts) / sw
    my = sum(w * y for w, _, y in pts) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x, _ in pts)
    sxy = sum(w * (x - mx) * (y - my) for w, x, y in pts)
    b = sxy / sxx if sxx > 0 else 0.0
    if b <= 0:
        return my, 0.0
    a = my - b * mx
    if a < 0:                                   # through the origin
        b = sum(w * x * y for w, x, y in pts) / max(sum(w * x * x for w, x, _ in pts), 1e-30)
        a = 0.0
    return a, b


DEFAULT_BW = {"cpu": 10e9, "disk": 1.5e9, "remote": 0.5e9, "copy_in": 10e9}   # bytes/s until measured


class LoadPolicy:
    """Load a hit chain or recompute it (``policy="cost"``; ``"always"`` loads). The load side: bytes /
    the tier's measured bandwidth (disk/remote: read + verify on the reader pool, plus the copy of the
    verified payloads into the pages, ``copy_in``); a disk/remote tier's default bandwidth is never used
    for a decision (the caller probes it first). Each decision is kept in ``last`` (the bench reports it)."""

    def __init__(self, policy: str = "cost") -> None:
        self.policy = policy
        self.bandwidth = dict(DEFAULT_BW)
        self.measured: set[str] = set()
        self._acc: dict[str, tuple[float, float]] = {}     # (bytes, seconds) pooled per tier
        self.prefill = PrefillCost()
        self.last: dict | None = None
        self.decisions = {"load": 0, "recompute": 0, "stopped": 0}

    @property
    def active(self) -> bool:
        return self.policy == "cost" and self.prefill.measured

    def measure(self, tier: str, nbytes: int, seconds: float) -> None:
        """The first measurement replaces the default; later ones are pooled by bytes (bytes / seconds, both
        summed with the older ones halved at each new one), so a large read outweighs a small probe."""
        if seconds > 0 and nbytes >= 4096:
            acc = self._acc.get(tier, (0.0, 0.0))
            acc = (0.5 * acc[0] + nbytes, 0.5 * acc[1] + seconds)
            self._acc[tier] = acc
            self.bandwidth[tier] = acc[0] / acc[1]
            self.measured.add(tier)

    def estimate_load(self, sources: list[str], page_bytes: int) -> float:
        s = 0.0
        for src in sources:
            s += page_bytes / self.bandwidth[src]
            if src != "cpu":
                s += page_bytes / self.bandwidth["copy_in"]
        return s

    def pays(self, sources: list[str], page_bytes: int, page_size: int, start_page: int = 0) -> bool:
        """Whether loading pages from ``sources`` (one tier name per page, the chain starting at page
        ``start_page``) beats recomputing them."""
        recompute = self.prefill.estimate(len(sources) * page_size, start_page * page_size)
        if recompute is None:
            return True
        load = self.estimate_load(sources, page_bytes)
        choice = "load" if load < recompute else "recompute"
        self.last = {"choice": choice, "pages": len(sources), "start_page": start_page,
                     "est_load_s": load, "est_recompute_s": recompute,
                     "bandwidth_GBps": {t: self.bandwidth[t] / 1e9 for t in sorted(set(sources))}}
        self.decisions[choice] += 1
        return choice == "load"

    def stopped(self, pages_read: int, est_rest_s: float, est_recompute_s: float) -> None:
        """A chain decided for loading was dropped while being read (the disk gave less than estimated)."""
        self.decisions["stopped"] += 1
        self.last = {**(self.last or {}), "choice": "recompute", "stopped_after_pages": pages_read,
                     "est_rest_load_s": est_rest_s, "est_recompute_s": est_recompute_s}


class ReadWatch:
    """Checks a chain's reads while they land: a probe (or an old measurement) may promise more than the disk
    now gives (e.g. its first pages were still in the page cache). The reads so far are paid; the rest is
    worth reading only while reading it (at the rate seen lately) plus the copy-in beats recomputing the
    whole chain. When it no longer does, the chain is dropped and recomputed -- at most about twice the
    better choice's time.

    The rate is measured after a warm-up of ``WARMUP`` x the recompute estimate: the read pool's first pages
    arrive slowly (measured on the H200: 0.30 GB/s over the first 0.44 s of a 17 GB chain from a disk that
    gives 1.1 GB/s), and judging by them dropped a load that was the better choice. So the judgement is on
    the rate from the end of the warm-up on, over at least as long again."""

    WARMUP = 0.05

    def __init__(self, cost, page_bytes: int, recompute: float, copy_in: float) -> None:
        self.cost, self.page_bytes, self.recompute, self.copy_in = cost, page_bytes, recompute, copy_in
        self.warmup = self.WARMUP * recompute
        self._mark: tuple[int, float] | None = None       # (bytes, seconds) at the end of the warm-up
        self.stopped = False

    def __call__(self, done_bytes: int, pages_left: int, seconds: float) -> bool:
        if done_bytes <= 0 or seconds <= 0:
            return True
        if self._mark is None:
            if seconds >= self.warmup:
                self._mark = (done_bytes, seconds)
            return True
        b0, s0 = self._mark
        if seconds - s0 < self.warmup or done_bytes <= b0:
            return True
        rest = pages_left * self.page_bytes * (seconds - s0) / (done_bytes - b0) + self.copy_in
        if rest < self.recompute:
            return True
        self.stopped = True
        self.cost.stopped(done_bytes // self.page_bytes, rest, self.recompute)
        return False
