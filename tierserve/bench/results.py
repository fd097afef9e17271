"""The result-file shape shared by every `tierserve bench` and `tierserve eval` run (DESIGN.md)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton", "transformers", "tierserve"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def tierserve_env() -> dict[str, str]:
    """The ``TIERSERVE_*`` environment switches of this run (kernel choices such as TIERSERVE_TOPK): a result
    says which variants produced it."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("TIERSERVE_") and k != "TIERSERVE_API_KEY"}


def make_result(tool: str, subcommand: str, settings: dict[str, Any], rows: list[dict],
                summary: dict[str, Any]) -> dict:
    return {"meta": {"tool": tool, "subcommand": subcommand, "settings": settings, "versions": versions(),
                     "device": device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "env": tierserve_env()},
            "rows": rows, "summary": summary}


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def row_emitter(rows: list[dict], settings: dict[str, Any], partial_path: str | Path | None = None,
                progress=None):
    """``emit(row)``: append to ``rows``, to ``partial_path`` as a JSON line (after a ``run_start`` line with
    the settings, so a run killed by a time limit keeps its finished rows) and show it via ``progress``."""
    import time

    partial = Path(partial_path) if partial_path else None
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("a") as f:
            f.write(json.dumps({"run_start": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": settings},
                               default=str) + "\n")

    def emit(row: dict) -> None:
        rows.append(row)
        if partial:
            with partial.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        if progress:
            progress(row)
    return emit


def read_partial(partial: str | Path) -> tuple[dict[str, Any], list[dict]]:
    """The settings and rows of the last run in a ``row_emitter`` partial file."""
    settings: dict[str, Any] = {}
    rows: list[dict] = []
    for line in Path(partial).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "run_start" in rec:
            settings, rows = rec["settings"], []
        else:
            rows.append(rec)
    return settings, rows


def result_from_partial(partial: str | Path, subcommand: str, summarize, device: str | None = None) -> dict:
    """The result of a run that was stopped, rebuilt from its partial file: ``summarize(settings, rows)`` gives
    the summary; ``device`` names the machine the rows were measured on (this machine by default)."""
    settings, rows = read_partial(partial)
    res = make_result("tierserve bench", subcommand, settings, rows, summarize(settings, rows))
    res["meta"]["status"] = f"partial: rebuilt from {Path(partial).name} (the run was stopped before it finished)"
    if device:       # measured elsewhere: this machine's name and package versions would be wrong
        res["meta"]["device"] = device
        res["meta"]["versions"] = {"note": "not recorded in the partial file"}
    return res
