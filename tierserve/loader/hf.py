"""Hugging Face checkpoint directories: config.json, generation_config.json, safetensors shards."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from tierserve.progress import ProgressBar

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tierserve-nano"
CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """None -> the embedded default; a shipped config name (e.g. llama-3.1-8b) -> its folder."""
    if model is None:
        return DEFAULT_MODEL
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    named = CONFIGS / str(model)
    if named.is_dir():
        return named
    raise FileNotFoundError(f"model {str(model)!r}: no such directory (and not a shipped config name; "
                            f"shipped: {', '.join(shipped_configs()) or 'none'}). tierserve loads local "
                            "checkpoint directories only; it never downloads from a hub")


def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()) if CONFIGS.is_dir() else []


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def load_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"missing config.json in {path}")
    return _read_json(f)


def load_generation_config(path: Path) -> dict:
    f = path / "generation_config.json"
    return _read_json(f) if f.is_file() else {}


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"no safetensors weights in {path} (expected model.safetensors or "
                            "model.safetensors.index.json)")


def iter_safetensors(files: list[Path], device: torch.device | str, progress: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) straight onto ``device``, one tensor at a time (no whole-model CPU copy)."""
    from safetensors import safe_open

    dev = str(device)
    todo = []
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            todo += [(f, k) for k in h.keys()]
    bar = ProgressBar("loading weights", len(todo)) if progress else None
    try:
        for f in files:
            with safe_open(str(f), framework="pt", device=dev) as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)
                    if bar:
                        bar.advance()
    finally:
        if bar:
            bar.close()

