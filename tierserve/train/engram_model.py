"""The Engram nano model for training: a transformers ``LlamaForCausalLM`` with Engram modules joined by
forward pre-hooks (``EngramLlama``), its optimizer groups, train/eval steps with n-gram look-back, greedy
sampling and the checkpoint save/load in tierserve's layout. The run itself is ``tierserve.train.engram_nano``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.memory.engram import Engram
from tierserve.memory.engram_config import EngramConfig
from tierserve.memory.engram_hash import NgramHasher
from tierserve.train import nano

TABLE_STD = 1.0


class EngramLlama(nn.Module):
    """``lm`` (a transformers LlamaForCausalLM) with ``engram[str(i)]`` joined before decoder layer i.

    Set ``history`` ([B, lookback] raw ids, -1 before the stream start) before a forward whose windows do not
    start at a sequence start; it is used by the next forward only (None: every row starts a sequence)."""

    def __init__(self, lm: nn.Module, ecfg: EngramConfig, hasher: NgramHasher) -> None:
        super().__init__()
        ecfg.check_model(lm.config.num_hidden_layers)
        self.lm, self.ecfg, self.hasher = lm, ecfg, hasher
        self.engram = nn.ModuleDict({str(i): Engram(ecfg, i, lm.config.hidden_size, lm.config.rms_norm_eps)
                                     for i in ecfg.layers})
        self.history: torch.Tensor | None = None
        self._rows: dict[int, torch.Tensor] = {}
        lm.register_forward_pre_hook(self._hash_rows, with_kwargs=True)
        for i in ecfg.layers:
            lm.model.layers[i].register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True)

    @property
    def config(self):
        return self.lm.config

    def forward(self, *args, **kwargs):
        return self.lm(*args, **kwargs)

    @torch.no_grad()
    def reset_engram(self, generator: torch.Generator) -> None:
        for m in self.engram.values():
            m.reset_parameters(generator, table_std=TABLE_STD)
            m.value_proj.weight.zero_()          # step 0 computes the baseline's function

    def _hash_rows(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("the Engram training model needs input_ids (its rows are hashed from them)")
        B, T = ids.shape
        L = self.ecfg.lookback
        hist = self.history if self.history is not None else torch.full((B, L), -1, dtype=torch.int64)
        self.history = None
        qsl = torch.arange(0, B * T + 1, T, device=ids.device)
        self._rows = self.hasher.row_ids_packed(ids.reshape(-1), qsl, hist.to(ids.device).view(B, L))

    def _make_layer_hook(self, i: int):
        def hook(_module, args, kwargs):
            if args:
                h, args = args[0], args[1:]
            else:
                h = kwargs.pop("hidden_states")
            h = h + self.engram_out(i, h)
            return (h, *args), kwargs
        return hook

    def engram_out(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Engram's term for decoder layer i: hidden [B, T, C] -> [B, T, C] (rows from ``_hash_rows``)."""
        m = self.engram[str(i)]
        B, T, C = hidden.shape
        table = m.table
        # = table.gather(rows) for a device float table (index_select), written as an embedding so the table's
        # gradient uses the deterministic embedding backward.
        emb = F.embedding(self._rows[i], table.weight).to(table.out_dtype).reshape(B * T, -1)
        out, _ = m(hidden.reshape(B * T, C), emb)
        return out.view(B, T, C)

    def engram_params(self) -> int:
        return sum(p.numel() for p in self.engram.parameters())


def make_canonical(tok_dir: Path, vocab: int):
    """Canonical ids exactly as the engine builds them (``ModelRunner.set_tokenizer``)."""
    from tierserve.loader.tokenizer import Tokenizer
    from tierserve.memory.engram_canonical import build_canonical_ids

    return build_canonical_ids(Tokenizer.from_dir(tok_dir), vocab_size=vocab)


def make_engram_optimizer(model: EngramLlama, lr: float, wd: float, device: torch.device, lr_mult: float,
                          table_wd: float = 0.0):
    """nano's AdamW groups for the backbone and the projections; table rows: ``table_wd`` decay (default
    none), ``lr_mult`` x lr."""
    tables = {id(m.table.weight) for m in model.engram.values()}
    params = [p for p in model.parameters() if id(p) not in tables]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
              {"params": [m.table.weight for m in model.engram.values()], "weight_decay": table_wd,
               "lr_mult": lr_mult}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def look_back(stream: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] tokens before each window start, -1 before the stream start."""
    pos = starts.to(stream.device)[:, None] + torch.arange(-n, 0, device=stream.device)
    return torch.where(pos >= 0, stream[pos.clamp_min(0)], -1)


def engram_train_step(model: EngramLlama, opt, stream, gen, cfg, lr: float):
    """``nano.train_step`` with look-back for the windows (the same draws from ``gen``)."""
    def attach(starts):
        model.history = look_back(stream, starts, model.ecfg.lookback)
    return nano.train_step(model, opt, stream, gen, cfg, lr, before_forward=attach)


@torch.no_grad()
def engram_evaluate(model: EngramLlama, stream: torch.Tensor, ctx: int, batch: int) -> tuple[float, int]:
    """``nano.evaluate`` (same windows, every token after the first scored once) with each window's look-back."""
    was = model.training
    model.eval()
    L = model.ecfg.lookback
    n = len(stream) - 1
    starts = torch.arange(0, n, ctx)
    full, tail = starts[starts + ctx <= n], starts[starts + ctx > n]
    total, count = 0.0, 0
    for i in range(0, len(full), batch):
        x, y = nano.windows(stream, full[i:i + batch], ctx)
        model.history = look_back(stream, full[i:i + batch], L)
        total += nano.lm_loss(model, x, y, "sum").item()
        count += y.numel()
    for s in tail.tolist():
        model.history = look_back(stream, torch.tensor([s]), L)
        total += nano.lm_loss(model, stream[None, s:n], stream[None, s + 1:n + 1], "sum").item()
        count += n - s
    model.train(was)
    return total, count


@torch.no_grad()
def greedy(model: nn.Module, prompt: list[int], n: int, device: torch.device) -> list[int]:
    """Greedy continuation without a KV cache (every forward sees the whole sequence from its start)."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
        ids.append(int(logits[0, -1].float().argmax()))
    return ids[len(prompt):]


# ---- save / load ----------------------------------------------------------------------------------------------
def save_engram_model(model: EngramLlama, out: Path) -> None:
    """HF dir of the backbone, plus config.json "engram" and ``model.layers.N.engram.*`` in model.safetensors."""
    from safetensors.torch import load_file, save_file

    model.lm.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["engram"] = model.ecfg.to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    for i, m in model.engram.items():
        for name, t in m.checkpoint_tensors().items():
            tensors[f"model.layers.{i}.engram.{name}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_engram_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> EngramLlama:
    """The training model (transformers Llama + hooks) from a saved ``engram`` dir, for checks and fine-tuning."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    ecfg = EngramConfig.from_dict(raw["engram"])
    conf = LlamaConfig.from_pretrained(path)
    conf._attn_implementation = "eager"
    canon = make_canonical(path, conf.vocab_size)
    model = EngramLlama(LlamaForCausalLM(conf), ecfg, NgramHasher(ecfg, canon.table, canon.num_canonical))
    tensors = load_file(str(path / "model.safetensors"))
    lm_sd, eng = {}, {}
    for k, v in tensors.items():
        if ".engram." in k:
            i, rest = k.removeprefix("model.layers.").split(".engram.", 1)
            eng[(i, rest)] = v
        else:
            lm_sd[k] = v
    missing, unexpected = model.lm.load_state_dict(lm_sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and conf.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for (i, rest), v in eng.items():
        model.engram[i].load_tensor(rest, v)
    if conf.tie_word_embeddings:
        model.lm.tie_weights()
    return model.to(device=device, dtype=dtype).eval()
