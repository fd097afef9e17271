"""Sliding-window perplexity and bits per byte, through the engine's prompt logprobs.

Each document is tokenized without special tokens and, by default, preceded by one document-start token
(the tokenizer's BOS, else its first EOS -- the separator tierserve-nano was trained with), so that every
token of the text is scored. Windows of ``context`` tokens start every ``stride`` tokens; each window
scores only the tokens no earlier window scored, so after the first window every scored token sees at
least ``context - stride`` tokens of context (the Hugging Face perplexity recipe).

    ppl = exp(sum NLL / scored tokens)        bits_per_byte = sum NLL / ln 2 / UTF-8 bytes of the text

Without a local tokenizer (an endpoint and no ``--tokenizer``) documents are cut into text chunks at line
boundaries and scored chunk by chunk (the first token of each chunk unscored): marked ``"approximate"``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tierserve.eval.client import Advance, EndpointGenerator, Generator, _noop

Document = tuple[str, str]          # (id, text)


@dataclass
class PplResult:
    nll: float          # sum of negative log-likelihoods, nats
    tokens: int         # scored tokens
    bytes: int          # UTF-8 bytes of the scored text
    documents: int
    windows: int
    seconds: float
    approximate: bool = False

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def metrics(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "bits_per_byte": self.bits_per_byte,
                "nll_per_token": self.nll / self.tokens if self.tokens else None, "tokens": self.tokens,
                "bytes": self.bytes, "documents": self.documents, "windows": self.windows,
                "seconds": round(self.seconds, 3), "approximate": self.approximate}


# ---- data ---------------------------------------------------------------------------------------------
def load_documents(data: Sequence[str | Path] = (), corpus: str | None = None,
                   max_bytes: int | None = None) -> list[Document]:
    """``--data`` files (plain text: one document; ``.jsonl``: one ``{"text": ...}`` per line) and/or
    ``--corpus nano-heldout`` (the held-out split of tierserve-nano's training corpus)."""
    docs: list[Document] = []
    for f in data:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"--data {p}: no such file")
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    docs.append((f"{p.name}:{i + 1}", str(json.loads(line)["text"])))
        else:
            docs.append((p.name, p.read_bytes().decode("utf-8", errors="replace")))
    if corpus:
        if corpus != "nano-heldout":
            raise ValueError(f"--corpus must be nano-heldout, got {corpus!r}")
        from tierserve.train.corpus import collect_corpus, read_text
        c = collect_corpus()
        docs += [(c.rel(p), read_text(p)) for p in c.heldout_files]
    docs = [(i, t) for i, t in docs if t]
    if not docs:
        raise ValueError("no text to score: give --data FILE or --corpus nano-heldout")
    if max_bytes is not None:
        out, total = [], 0
        for i, t in docs:
            if total >= max_bytes:
                break
            b = t.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
            out.append((i, b))
            total += len(b.encode("utf-8"))
        docs = [(i, t) for i, t in out if t]
    return docs


# ---- windows ------------------------------------------------------------------------------------------
def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` over a sequence of ``n`` tokens: the window is ``ids[begin:end]`` and
    it scores positions ``first_scored .. end-1`` (position 0 is never scored: it has no context)."""
    if context < 2 or not 1 <= stride < context:
        raise ValueError(f"need context >= 2 and 1 <= stride < context, got context={context}, stride={stride}")
    out, begin, scored_to = [], 0, 1
    while scored_to < n:
        end = min(begin + context, n)
        if end > scored_to:
            out.append((begin, end, scored_to))
            scored_to = end
        begin += stride
    return out


def doc_start_token(tokenizer) -> int | None:
    if getattr(tokenizer, "bos_token_id", None) is not None:
        return tokenizer.bos_token_id
    eos = getattr(tokenizer, "eos_token_ids", None) or []
    return eos[0] if eos else None


def evaluate(gen: Generator, docs: Sequence[Document], context: int, stride: int, add_bos: bool = True,
             advance: Advance = _noop, on_total: Advance = _noop) -> PplResult:
    """Perplexity of ``docs`` under ``gen``. ``on_total(n)`` is told the number of windows first."""
    t0 = time.perf_counter()
    tok = gen.tokenizer
    if tok is None:
        if not isinstance(gen, EndpointGenerator):
            raise ValueError("perplexity needs a tokenizer")
        return _evaluate_text(gen, docs, context, advance, on_total, t0)
    start = doc_start_token(tok) if add_bos else None
    prompts: list[list[int]] = []
    spans: list[tuple[int, int, int]] = []          # (begin, first_scored, end) per window
    n_bytes = 0
    for _, text in docs:
        ids = tok.encode(text, add_special_tokens=False)
        if start is not None:
            ids = [start] + ids
            n_bytes += len(text.encode("utf-8"))
        elif ids:
            n_bytes += len(text.encode("utf-8")) - len(tok.decode(ids[:1]).encode("utf-8"))
        for b, e, s in windows(len(ids), context, stride):
            prompts.append(ids[b:e])
            spans.append((b, s, e))
    on_total(len(prompts))
    lps = gen.score(prompts, advance)
    nll, count = 0.0, 0
    for (b, s, e), lp in zip(spans, lps):
        part = lp[s - b - 1: e - b - 1]       # lp[j] is the logprob of position b + 1 + j
        nll -= math.fsum(part)
        count += len(part)
    return PplResult(nll, count, n_bytes, len(docs), len(prompts), time.perf_counter() - t0)


def _chunks(text: str, max_chars: int) -> list[str]:
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:max_chars])
            line = line[max_chars:]
        if len(cur) + len(line) > max_chars and cur:
            out.append(cur)
            cur = ""
        cur += line
    return out + ([cur] if cur else [])


def _evaluate_text(gen: EndpointGenerator, docs, context, advance, on_total, t0) -> PplResult:
    chunks = [c for _, t in docs for c in _chunks(t, max(64, context * 2))]   # ~2 chars per token, safe side
    on_total(len(chunks))
    lps = gen.score_text(chunks, advance)
    nll = -math.fsum(x for lp in lps for x in lp)
    return PplResult(nll, sum(len(lp) for lp in lps), sum(len(t.encode("utf-8")) for _, t in docs), len(docs),
                     len(chunks), time.perf_counter() - t0, approximate=True)


def resolve_window(gen: Generator, context: int | None, stride: int | None) -> tuple[int, int]:
    """Default context: 2048 or the model's max_model_len - 1 if smaller; default stride: context / 4."""
    limit = gen.max_model_len - 1 if gen.max_model_len else None
    if context is None:
        context = min(2048, limit) if limit else 2048
    elif limit and context > limit:
        raise ValueError(f"--context {context} does not fit max_model_len {gen.max_model_len} "
                         f"(a window plus one generated token must fit); use --context {limit} or less")
    stride = stride if stride is not None else max(1, context // 4)
    if not 1 <= stride < context:
        raise ValueError(f"--stride must be in [1, --context={context}), got {stride}")
    return context, stride


def compare_rows(labels: Sequence[str], results: Sequence[PplResult], engine: str) -> list[dict[str, Any]]:
    """One row per setting, with deltas against the first."""
    base = results[0]
    rows = []
    for lab, r in zip(labels, results):
        row = {"id": lab, "engine": engine, "setting": lab, **r.metrics()}
        row["delta_ppl_pct"] = 100.0 * (r.ppl / base.ppl - 1.0) if base.tokens else None
        row["delta_bits_per_byte"] = r.bits_per_byte - base.bits_per_byte if base.bytes else None
        rows.append(row)
    return rows


def print_table(rows: Sequence[dict[str, Any]], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="perplexity" + (" (deltas against the first setting)" if len(rows) > 1 else ""))
    for col in ("setting", "ppl", "Δppl %", "bits/byte", "Δbits/byte", "tokens", "seconds"):
        t.add_column(col, justify="left" if col == "setting" else "right", overflow="fold")
    for r in rows:
        t.add_row(r["setting"], f"{r['ppl']:.4f}", f"{r['delta_ppl_pct']:+.3f}", f"{r['bits_per_byte']:.4f}",
                  f"{r['delta_bits_per_byte']:+.4f}", f"{r['tokens']:,}", f"{r['seconds']:.1f}")
    (console or Console(stderr=True)).print(t)
