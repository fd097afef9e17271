"""One "generator" interface for every eval, with two implementations:

- ``LocalGenerator``: the in-process engine (``tierserve.LLM``) with any engine settings;
- ``EndpointGenerator``: any OpenAI-compatible server through ``/v1/completions`` (and
  ``/v1/chat/completions`` for ``chat=True``), e.g. ``tierserve serve``, vLLM, SGLang or a provider.

Prompt scoring (perplexity) uses ``prompt_logprobs`` in-process and, on an endpoint, the vLLM semantics of
``echo=True, logprobs=0, max_tokens=1``: the response's ``token_logprobs`` start with the prompt's own
tokens (the first one ``null``), followed by the one generated token, which is ignored.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

Advance = Callable[[int], None]


def _noop(n: int) -> None:
    pass


@dataclass
class GenParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str | None = None      # "stop" | "length" | "error: ..."


class Generator(ABC):
    kind: str = "?"
    name: str = "?"
    tokenizer: Any = None                  # encode/decode, when known
    max_model_len: int | None = None

    @abstractmethod
    def complete(self, prompts: Sequence[str], params: GenParams, chat: bool = False,
                 advance: Advance = _noop) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order."""

    @abstractmethod
    def score(self, prompts: Sequence[list[int]], advance: Advance = _noop) -> list[list[float]]:
        """For each token-id prompt, the logprob of tokens 1..n-1 given the tokens before them."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.name}

    def close(self) -> None:
        pass


class LocalGenerator(Generator):
    kind = "local"

    def __init__(self, model: str | None = None, batch_size: int = 64, **engine_settings: Any) -> None:
        from tierserve import LLM

        self.llm = LLM(model=model, **engine_settings)
        self.name = str(model) if model else "tierserve-nano"
        self.settings = dict(engine_settings)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.config.max_model_len
        self.batch_size = batch_size

    def _batches(self, n: int):
        for i in range(0, n, self.batch_size):
            yield i, min(n, i + self.batch_size)

    def complete(self, prompts, params, chat=False, advance=_noop):
        from tierserve import SamplingParams

        sp = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                            max_tokens=params.max_tokens, stop=list(params.stop) or None, seed=params.seed)
        tok = self.tokenizer
        encoded: list[list[int]] = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            if chat else tok.encode(p) for p in prompts]
        results: list[list[Completion]] = [[] for _ in prompts]
        ok = [i for i, ids in enumerate(encoded) if len(ids) < self.max_model_len]
        for i, ids in enumerate(encoded):
            if len(ids) >= self.max_model_len:
                results[i] = [Completion("", f"error: prompt has {len(ids)} tokens, max_model_len is "
                                             f"{self.max_model_len}")] * params.n
        if len(ok) < len(prompts):
            advance(len(prompts) - len(ok))
        for lo, hi in self._batches(len(ok)):
            idx = ok[lo:hi]
            outs = self.llm.generate([encoded[i] for i in idx], sp)
            for i, out in zip(idx, outs):
                results[i] = [Completion(o.text, o.finish_reason) for o in out.outputs]
            advance(len(idx))
        return results

    def score(self, prompts, advance=_noop):
        from tierserve import SamplingParams

        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out: list[list[float]] = []
        for lo, hi in self._batches(len(prompts)):
            for ids, res in zip(prompts[lo:hi], self.llm.generate([list(p) for p in prompts[lo:hi]], sp)):
                plp = res.prompt_logprobs or []
                out.append([plp[i][ids[i]] for i in range(1, len(ids))])
            advance(hi - lo)
        return out

    def describe(self):
        return {"kind": self.kind, "model": self.name, "engine_settings": self.settings,
                "max_model_len": self.max_model_len}

    def close(self) -> None:
        self.llm = None      # drop the engine (and its KV pool) before the next --compare setting
        import gc

        import torch
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class EndpointError(RuntimeError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# statuses that concern one request (e.g. a prompt longer than the server's context): recorded per item
_PER_ITEM = (400, 413, 422)


class EndpointGenerator(Generator):
    """An OpenAI-compatible server. ``tokenizer``: a local HF tokenizer dir for token-exact evals (perplexity
    windows, needle lengths); without one, ``model`` is tried as a local directory."""
    kind = "endpoint"

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, tokenizer: str | None = None,
                 concurrency: int = 8, timeout: float = 600.0, retries: int = 3, max_model_len: int | None = None,
                 transport: Any = None) -> None:
        import httpx

        base = endpoint.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.endpoint, self.name, self.concurrency, self.retries = endpoint, model, max(1, concurrency), retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout, transport=transport)
        self.max_model_len = max_model_len
        self.tokenizer = _load_tokenizer(tokenizer or model)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        last, status = "", None
        for attempt in range(self.retries + 1):
            try:
                r = self.http.post(self.base + path, json=body)
            except httpx.TransportError as e:
                last, status = f"{type(e).__name__}: {e}", None
            else:
                if r.status_code == 200:
                    return r.json()
                last, status = f"HTTP {r.status_code}: {r.text[:500]}", r.status_code
                if r.status_code not in (429, 500, 502, 503, 504):
                    break
            if attempt < self.retries:
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise EndpointError(f"{self.base}{path}: {last}", status)

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any], advance: Advance) -> list[Any]:
        def run(x):
            try:
                return fn(x)
            finally:
                advance(1)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(run, items))

    def complete(self, prompts, params, chat=False, advance=_noop):
        def one(prompt: str) -> list[Completion]:
            try:
                return request(prompt)
            except EndpointError as e:
                if e.status not in _PER_ITEM:
                    raise
                return [Completion("", f"error: {e}"[:300])] * params.n

        def request(prompt: str) -> list[Completion]:
            body: dict[str, Any] = {"model": self.name, "max_tokens": params.max_tokens,
                                    "temperature": params.temperature, "top_p": params.top_p, "n": params.n}
            if params.stop:
                body["stop"] = list(params.stop)     # also applied here below: servers may ignore some
            if params.seed is not None:
                body["seed"] = params.seed
            if chat:
                body["messages"] = [{"role": "user", "content": prompt}]
                data = self.post("/chat/completions", body)
                texts = [(c.get("message") or {}).get("content") or "" for c in _by_index(data)]
            else:
                body["prompt"] = prompt
                data = self.post("/completions", body)
                texts = [c.get("text") or "" for c in _by_index(data)]
            reasons = [c.get("finish_reason") for c in _by_index(data)]
            return [Completion(truncate_at_stop(t, params.stop), r) for t, r in zip(texts, reasons)]
        return self._map(one, prompts, advance)

    def score(self, prompts, advance=_noop):
        def one(ids: list[int]) -> list[float]:
            lps, _ = self._echo(list(ids))
            if len(lps) < len(ids):
                raise EndpointError(f"{self.base}/completions echoed {len(lps)} prompt logprobs for a prompt of "
                                    f"{len(ids)} tokens: the server must support echo=True with logprobs")
            return [float(x) for x in lps[1:len(ids)]]
        return self._map(one, prompts, advance)

    def score_text(self, texts: Sequence[str], advance: Advance = _noop) -> list[list[float]]:
        """Without a local tokenizer: score text prompts; the server tokenizes. Returns the logprobs of the
        prompt tokens after the first."""
        def one(text: str) -> list[float]:
            lps, n_prompt = self._echo(text)
            return [float(x) for x in lps[1:n_prompt]]
        return self._map(one, texts, advance)

    def _echo(self, prompt: str | list[int]) -> tuple[list[float | None], int]:
        data = self.post("/completions", {"model": self.name, "prompt": prompt, "echo": True, "logprobs": 0,
                                          "max_tokens": 1, "temperature": 0.0})
        choice = _by_index(data)[0]
        lps = list(((choice.get("logprobs") or {}).get("token_logprobs")) or [])
        n_prompt = (data.get("usage") or {}).get("prompt_tokens")
        if n_prompt is None:
            n_prompt = len(prompt) if isinstance(prompt, list) else max(0, len(lps) - 1)
        if any(x is None for x in lps[1:n_prompt]):
            raise EndpointError(f"{self.base}/completions returned null prompt logprobs after the first token")
        return lps, n_prompt

    def describe(self):
        return {"kind": self.kind, "model": self.name, "endpoint": self.endpoint,
                "tokenizer": "local" if self.tokenizer is not None else "server"}

    def close(self) -> None:
        self.http.close()


def _by_index(data: dict[str, Any]) -> list[dict[str, Any]]:
    choices = data.get("choices")
    if not choices:
        raise EndpointError(f"response has no choices: {str(data)[:300]}")
    return sorted(choices, key=lambda c: c.get("index", 0))


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut at the first stop string (servers may honour only some of them, or none)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def _load_tokenizer(path: str | None):
    if not path or not (Path(path) / "tokenizer.json").is_file():
        return None
    from tierserve.loader.tokenizer import Tokenizer
    return Tokenizer.from_dir(path)


def make_generator(model: str | None = None, endpoint: str | None = None, api_key: str | None = None,
                   tokenizer: str | None = None, concurrency: int = 8, **engine_settings: Any) -> Generator:
    """The in-process engine, or the endpoint when ``endpoint`` is given (then ``model`` is its model name and
    the engine settings ``max_model_len`` and ``tokenizer``, if given, are the server's context length and a
    local copy of its tokenizer)."""
    if endpoint:
        if not model:
            raise ValueError("--model NAME is required with --endpoint (the server's model name)")
        max_model_len = engine_settings.pop("max_model_len", None)
        tokenizer = tokenizer or engine_settings.pop("tokenizer", None)
        if engine_settings:
            raise ValueError("engine settings (" + ", ".join("--" + k.replace("_", "-") for k in engine_settings)
                             + ") apply to the in-process engine only, not with --endpoint")
        return EndpointGenerator(endpoint, model, api_key, tokenizer, concurrency, max_model_len=max_model_len)
    if tokenizer and "tokenizer" not in engine_settings:
        engine_settings["tokenizer"] = tokenizer
    return LocalGenerator(model, **engine_settings)
