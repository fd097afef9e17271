"""Distil a lightning indexer for a dense model (``tierserve train-indexer``).

The model stays frozen. For windows of local text (the nano corpus: the Python standard library) the
model runs once in transformers with eager attention; each layer's target is its attention distribution
averaged over heads, and its indexer -- fed the same normalised hidden state -- is trained to match it
by KL divergence (DeepSeek-V3.2's dense warm-up). Reported on held-out windows: the KL, and the share
of the model's attention mass inside the indexer's top ``topk_frac`` keys per query (token level).
Writes ``indexer.safetensors`` + ``indexer.json`` (with the training curve and held-out numbers).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from tierserve.attention.indexer import IndexerConfig, IndexerSet, token_scores


def _windows(ids: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def _layer_inputs(hf, x: torch.Tensor):
    """Per layer: (normalised input h [B, S, hidden], head-mean attention [B, S, S]) of the frozen model."""
    with torch.no_grad():
        out = hf(input_ids=x, output_attentions=True, output_hidden_states=True, use_cache=False)
    layers = hf.model.layers
    return [(layers[i].input_layernorm(out.hidden_states[i]).float(), out.attentions[i].float().mean(1))
            for i in range(len(layers))]


def _indexer_logits(idx, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, S, _ = h.shape
    q, k, w = idx(h.reshape(B * S, -1), cos.repeat(B, 1), sin.repeat(B, 1))
    scores = token_scores(q.view(B, S, idx.heads, -1), w.view(B, S, -1), k.view(B, S, -1))
    causal = torch.ones(S, S, dtype=torch.bool, device=h.device).tril()
    return scores.masked_fill(~causal, float("-inf"))


def _kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    t = target.clamp_min(1e-12)
    return (target * (t.log() - logp.clamp_min(-1e4))).sum(-1).mean()


def _recall(target: torch.Tensor, logits: torch.Tensor, frac: float) -> float:
    """Mean attention mass inside the top ceil(frac * (q+1)) keys of each query (queries >= 16)."""
    S = target.shape[-1]
    vals = []
    for qpos in range(16, S):
        k = max(1, math.ceil(frac * (qpos + 1)))
        top = logits[..., qpos, :qpos + 1].topk(k, dim=-1).indices
        vals.append(target[..., qpos, :qpos + 1].gather(-1, top).sum(-1).mean())
    return float(torch.stack(vals).mean())


def train_indexer(model: str | None, output: str | Path, *, steps: int = 300, seq_len: int = 512, batch: int = 4,
                  heads: int = 4, lr: float = 2e-3, seed: int = 0, topk_frac: float = 0.25,
                  eval_windows: int = 8, train_files: int = 400, device: str = "auto", progress=None) -> dict:
    import transformers

    from tierserve.loader.hf import load_config, resolve_model_path
    from tierserve.loader.tokenizer import Tokenizer
    from tierserve.models.config import ModelConfig
    from tierserve.models.layers.rotary import RotaryEmbedding
    from tierserve.train.corpus import collect_corpus, read_text

    path = resolve_model_path(model)
    cfg = ModelConfig.from_hf(load_config(path))
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").to(dev).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    tok = Tokenizer.from_dir(path)
    corpus = collect_corpus()
    # a few MB of text is plenty for a distillation of this size
    train_ids = torch.tensor(tok.encode("\n\n".join(read_text(f) for f in corpus.train_files[:train_files]),
                                        add_special_tokens=False))
    held_files = corpus.heldout_files[:max(4, train_files // 10)]
    held_ids = torch.tensor(tok.encode("\n\n".join(read_text(f) for f in held_files), add_special_tokens=False))
    rope = RotaryEmbedding(cfg.head_dim, seq_len, cfg.rope)
    rope.build(dev)
    cos, sin = rope.cos[:seq_len], rope.sin[:seq_len]
    icfg = IndexerConfig(cfg.num_layers, cfg.hidden_size, heads, cfg.head_dim)
    indexers = IndexerSet(icfg).to(dev)
    opt = torch.optim.AdamW(indexers.parameters(), lr=lr, weight_decay=0.0)
    curve, t0 = [], time.perf_counter()
    for step in range(steps):
        lr_now = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr_now
        x = _windows(train_ids, batch, seq_len, gen).to(dev)
        loss = sum(_kl(att, _indexer_logits(idx, h, cos, sin))
                   for idx, (h, att) in zip(indexers.layers, _layer_inputs(hf, x))) / cfg.num_layers
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(round(loss.item(), 5))
        if progress and (step % 20 == 0 or step == steps - 1):
            progress(step, curve[-1])
    held = _evaluate(hf, indexers, held_ids, seq_len, eval_windows, cos, sin, topk_frac, seed)
    extra = {"model": str(path), "steps": steps, "train_files": train_files, "seq_len": seq_len, "batch": batch, "lr": lr, "seed": seed,
             "train_seconds": round(time.perf_counter() - t0, 1), "device": str(dev), "loss_curve": curve,
             "heldout": held}
    indexers.save(output, extra)
    return extra


def _evaluate(hf, indexers, ids, seq_len, n, cos, sin, frac, seed) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    x = _windows(ids, n, seq_len, gen).to(cos.device)
    per_layer = []
    with torch.no_grad():
        for i, (idx, (h, att)) in enumerate(zip(indexers.layers, _layer_inputs(hf, x))):
            logits = _indexer_logits(idx, h, cos, sin)
            causal = torch.ones_like(att[0], dtype=torch.bool).tril()
            recent = torch.arange(att.shape[-1], device=att.device).float().expand_as(att[0])
            recency = recent.masked_fill(~causal, float("-inf"))           # baseline: keep the most recent keys
            per_layer.append({"layer": i, "kl": round(float(_kl(att, logits)), 5),
                              f"mass_recall_top{frac:g}": round(_recall(att, logits, frac), 4),
                              f"recent_only_mass_recall_top{frac:g}": round(_recall(att, recency.expand_as(att), frac), 4)})
    return {"windows": n, "per_layer": per_layer}
