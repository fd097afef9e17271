"""Passkey retrieval ("needle in a haystack") over a grid of context lengths x needle depths.

The haystack is local filler: ``text`` style is the passkey task of Mohtashami & Jaggi (2023) (repeated
"The grass is green. ..." sentences); ``code`` style hides ``PASS_KEY = 12345`` in filler Python functions and
asks ``assert PASS_KEY ==`` -- the form a code model such as tierserve-nano can answer. A trial is correct
when the first number in the greedy answer equals the passkey. Lengths are measured with the model's tokenizer
(or estimated at 4 characters per token for an endpoint without a local tokenizer).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tierserve.eval.client import Advance, Generator, GenParams, _noop

CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Style:
    intro: str
    question: str

    def filler(self, i: int) -> str:
        raise NotImplementedError

    def needle(self, key: int) -> str:
        raise NotImplementedError


class TextStyle(Style):
    def filler(self, i: int) -> str:
        return "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"

    def needle(self, key: int) -> str:
        return f"The pass key is {key}. Remember it. {key} is the pass key.\n"


class CodeStyle(Style):
    def filler(self, i: int) -> str:
        return f"def helper_{i}(value):\n    \"\"\"Return value shifted by {i}.\"\"\"\n    return value + {i}\n\n\n"

    def needle(self, key: int) -> str:
        return f"PASS_KEY = {key}  # the pass key: remember it\n\n\n"


STYLES = {
    "text": TextStyle("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                      "I will quiz you about the important info there.\n\n",
                      "\nWhat is the pass key? The pass key is"),
    "code": CodeStyle('"""Helpers. One constant in this module is the pass key."""\n\n\n', "\nassert PASS_KEY == "),
}


def build_prompt(style: Style, n_filler: int, depth: float, key: int) -> str:
    at = round(depth * n_filler)
    parts = [style.intro] + [style.filler(i) for i in range(at)] + [style.needle(key)]
    parts += [style.filler(i) for i in range(at, n_filler)] + [style.question]
    return "".join(parts)


def fit_prompt(style: Style, tokens: int, depth: float, key: int, count) -> tuple[str, int]:
    """The longest prompt with at most ``tokens`` tokens (by ``count``); returns (prompt, its length)."""
    lo, hi = 0, 1
    while count(build_prompt(style, hi, depth, key)) <= tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(build_prompt(style, mid, depth, key)) <= tokens:
            lo = mid
        else:
            hi = mid
    prompt = build_prompt(style, lo, depth, key)
    return prompt, count(prompt)


def answer_ok(text: str, key: int) -> bool:
    m = _NUMBER.search(text)
    return bool(m) and m.group(0) == str(key)


def run(gen: Generator, contexts: Sequence[int] = CONTEXTS, depths: Sequence[float] = DEPTHS, trials: int = 3,
        style: str = "text", max_tokens: int = 8, seed: int = 0, advance: Advance = _noop,
        on_total: Advance = _noop) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if style not in STYLES:
        raise ValueError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths must be in [0, 1], got {d}")
    st = STYLES[style]
    tok = gen.tokenizer
    count = (lambda s: len(tok.encode(s))) if tok is not None else (lambda s: (len(s) + 3) // 4)
    limit = gen.max_model_len - max_tokens if gen.max_model_len else None
    usable = [c for c in contexts if limit is None or c <= limit]
    skipped = [c for c in contexts if c not in usable]
    if not usable:
        raise ValueError(f"no context length fits max_model_len {gen.max_model_len} (asked {list(contexts)})")
    rng = random.Random(seed)
    cells, prompts = [], []
    for c in list(usable):
        if count(build_prompt(st, 0, 0.0, 99999)) > c:       # not even the bare question fits
            usable.remove(c)
            skipped.append(c)
            continue
        for d in depths:
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                prompt, n = fit_prompt(st, c, d, key, count)
                cells.append((c, d, key, n))
                prompts.append(prompt)
    if not usable:
        raise ValueError(f"no context length in {list(contexts)} fits both the prompt and max_model_len")
    on_total(len(prompts))
    outs = gen.complete(prompts, GenParams(max_tokens=max_tokens, temperature=0.0), advance=advance)
    rows = []
    for c in usable:
        for d in depths:
            idx = [i for i, cell in enumerate(cells) if cell[0] == c and cell[1] == d]
            ok = [answer_ok(outs[i][0].text, cells[i][2]) for i in idx]
            rows.append({"id": f"ctx={c}/depth={d:.2f}", "context": c, "depth": d, "trials": len(idx),
                         "correct": sum(ok), "accuracy": sum(ok) / len(idx) if idx else None,
                         "tokens": round(sum(cells[i][3] for i in idx) / len(idx)) if idx else 0,
                         "answers": [outs[i][0].text[:24] for i in idx]})
    total = sum(r["correct"] for r in rows)
    summary = {"accuracy": total / max(1, sum(r["trials"] for r in rows)),
               "accuracy_by_context": {str(c): _mean([r["accuracy"] for r in rows if r["context"] == c])
                                       for c in usable},
               "contexts": usable, "skipped_contexts": skipped, "depths": list(depths), "trials": trials,
               "style": style, "lengths": "tokenizer" if tok is not None else "estimated (4 chars/token)"}
    return rows, summary


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def heatmap(rows: Sequence[dict[str, Any]], path: Path, title: str = "passkey retrieval") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[next(r["accuracy"] for r in rows if r["context"] == c and r["depth"] == d) for c in contexts]
            for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(contexts) + 2, 0.6 * len(depths) + 1.6))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
