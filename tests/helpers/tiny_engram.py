"""A tiny Llama checkpoint with Engram memory on two layers (our layout: config.json "engram" +
``model.layers.N.engram.*`` tensors in the same safetensors file)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.helpers.tiny_models import make_checkpoint

ENGRAM = {"layers": [0, 1], "orders": [2, 3], "heads_per_order": 2, "dim_per_head": 8, "table_size": 97}


def make_engram_checkpoint(path: Path, seed: int = 0, **engram) -> Path:
    """``engram``: overrides of ENGRAM (e.g. conv_kernel_size=3: the conv gets random weights too)."""
    from tierserve.memory.engram import Engram
    from tierserve.memory.engram_config import EngramConfig

    path = make_checkpoint(Path(path), "llama", seed=seed)
    cfg = json.loads((path / "config.json").read_text())
    cfg["engram"] = {**ENGRAM, **engram}
    (path / "config.json").write_text(json.dumps(cfg))
    ecfg = EngramConfig.from_dict(cfg["engram"])
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for layer in ecfg.layers:
        m = Engram(ecfg, layer, cfg["hidden_size"], cfg["rms_norm_eps"])
        with torch.no_grad():
            m.reset_parameters(g, table_std=1.0)
            m.key_proj.weight.normal_(0, 0.3, generator=g)
            m.value_proj.weight.normal_(0, 0.3, generator=g)
            if m.conv is not None:
                m.conv.weight.normal_(0, 0.5, generator=g)
        for name, t in m.checkpoint_tensors().items():
            tensors[f"model.layers.{layer}.engram.{name}"] = t.contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
