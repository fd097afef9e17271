"""Train tierserve-nano with and without Engram memory on the same data: the issue-9 comparison.

    python -m tierserve.train.engram_nano --out DIR [--device cuda|cpu] [--size nano|tiny] [--seed 0]
        [--steps N] [--minutes M] [--max-files N] [--epochs E] [--evals 10] [--engram-layers 1[,2]]
        [--engram-heads H] [--engram-dim D] [--engram-rows R] [--engram-lr-mult M] [--engram-wd W]

Two models are trained on one corpus, one tokenizer and one token budget, with the same data order (one
``torch.Generator`` seeded the same way draws the windows of both) and the same backbone initialisation:

  DIR/baseline   the nano Llama of ``tierserve.train.nano`` (its functions, unchanged)
  DIR/engram     the same backbone plus Engram (``tierserve.memory``) before the attention of ``layers``

Engram is joined to the transformers ``LlamaForCausalLM`` with forward pre-hooks: one on the model hashes
the batch's token ids (with the 2 tokens before each window as look-back, -1 at the stream start) into the
row ids of every Engram layer; one on each carrying decoder layer adds ``Engram(hidden, rows)`` to its
``hidden_states`` before the layer's input norm and attention, the placement of the engine's
``DecoderLayer.forward``. Rows come from the device-placed ``EngramTable`` whose ``weight`` is an
``nn.Parameter`` (trained, no weight decay, ``--engram-lr-mult`` x the learning rate). ``value_proj`` starts
at zero, so at step 0 the Engram model computes exactly the baseline's function.

Both directories are HF-layout checkpoints that tierserve loads (``LLM(DIR/engram)``): the Engram one has the
``"engram"`` entry in config.json and ``model.layers.N.engram.*`` tensors in model.safetensors
(docs/engram.md). ``DIR/engram_vs_baseline.json`` holds both held-out losses (nats/token, perplexity,
bits/byte on the held-out split, bf16 weights as saved), parameter counts, steps, tokens, seconds and loss
curves; ``DIR/engram_vs_baseline.png`` plots the curves. Deterministic given (seed, step count): without
``--steps`` the step count is what fits in ``--minutes`` for both runs, capped at ``--epochs``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tierserve.memory.engram_config import EngramConfig
from tierserve.memory.engram_hash import NgramHasher
from tierserve.train import nano
from tierserve.train.corpus import SPLIT_SEED, collect_corpus, read_text
from tierserve.train.engram_model import (  # noqa: F401  (re-exported)
    TABLE_STD, EngramLlama, engram_evaluate, engram_train_step, greedy, load_engram_model, look_back,
    make_canonical, make_engram_optimizer, save_engram_model)

MAX_ENGRAM_FILE = 16 * 1024 * 1024        # the Engram nano's model.safetensors (bf16), to stay embeddable
# Engram per size. nano: one layer (after one full layer of context, as the paper's early placement), 2 orders
# x 4 heads x 32 dims (E = 256) and ~15k rows per head: 3.84M table + 0.13M projection params, 7.6 MiB in bf16
# on top of the 7.4 MiB backbone (a 15.0 MiB file). The projections add 2 x 2 x 256 x 256 FLOPs per token
# (~4% of the backbone's matmuls); the gather is the rest.
ENGRAM_SIZES = {
    "nano": {"layers": (1,), "orders": (2, 3), "heads_per_order": 4, "dim_per_head": 32, "table_size": 15_000},
    "tiny": {"layers": (1,), "orders": (2, 3), "heads_per_order": 2, "dim_per_head": 8, "table_size": 257},
}
ENGRAM_LR_MULT = 5.0        # table rows: Adam at 5x the learning rate, no weight decay (the paper's recipe)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tierserve.train.engram_nano", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (baseline/, engram/, JSON, PNG)")
    ap.add_argument("--device", default=None, help="cuda|cpu (default: cuda if available)")
    ap.add_argument("--size", choices=sorted(nano.SIZES), default="nano")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for both runs together")
    ap.add_argument("--steps", type=int, default=None, help="force the step count (else from --minutes)")
    ap.add_argument("--max-files", type=int, default=None, help="use a subset of the corpus (tests)")
    ap.add_argument("--epochs", type=float, default=None,
                    help="cap on passes over the training tokens when --steps is not given (0: no cap)")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--evals", type=int, default=10, help="held-out evaluations during each run (curve points)")
    ap.add_argument("--engram-layers", default=None, help="comma-separated decoder layers (default per size)")
    ap.add_argument("--engram-heads", type=int, default=None, help="hash heads per order")
    ap.add_argument("--engram-dim", type=int, default=None, help="row width per head")
    ap.add_argument("--engram-rows", type=int, default=None, help="requested rows per head (next unused prime)")
    ap.add_argument("--engram-lr-mult", type=float, default=ENGRAM_LR_MULT, help="table learning-rate factor")
    ap.add_argument("--engram-wd", type=float, default=0.0, help="AdamW weight decay of the table rows")
    return ap.parse_args(argv)


def engram_config(args, canonical_vocab_size: int) -> EngramConfig:
    d = dict(ENGRAM_SIZES[args.size])
    if args.engram_layers:
        d["layers"] = tuple(int(x) for x in args.engram_layers.split(","))
    for key, val in (("heads_per_order", args.engram_heads), ("dim_per_head", args.engram_dim),
                     ("table_size", args.engram_rows)):
        if val is not None:
            d[key] = val
    return EngramConfig(**d, conv_kernel_size=0, seed=args.seed, canonical_vocab_size=canonical_vocab_size)


# ---- the training model: transformers Llama + Engram through forward pre-hooks -------------------------------
# ---- the run ----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    return nano.run_deterministic(_run, parse_args(argv))


def _measure(make, step_fn, cfg, stream, device) -> float:
    """Seconds per training step of a throw-away model (mean of 10 after 3 warm-up)."""
    model, opt = make()
    return nano.time_steps(step_fn, model, opt, stream, cfg, device, warmup=3, n=10)


def _train(name, model, opt, step_fn, eval_fn, train_t, held_t, cfg, steps, seed, evals) -> dict:
    gen = torch.Generator().manual_seed(seed)           # the same window draws for both models
    curve_every = max(1, min(50, steps // 200))
    print_every = 100 if steps >= 1000 else max(1, steps // 10)
    eval_every = max(1, steps // evals) if evals > 0 else steps
    curve, heldout_curve, acc, acc_n = [], [], None, 0
    t0 = time.time()
    model.train()
    for step in range(steps):
        loss = step_fn(model, opt, train_t, gen, cfg, nano.lr_at(step, steps, cfg["lr"], cfg["warmup"]))
        acc = loss if acc is None else acc + loss
        acc_n += 1
        if (step + 1) % curve_every == 0 or step + 1 == steps:
            curve.append([step + 1, round(acc.item() / acc_n, 4)])
            acc, acc_n = None, 0
        if (step + 1) % print_every == 0 or step + 1 == steps:
            print(f"[{name}] step {step + 1}/{steps} loss {curve[-1][1]:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % eval_every == 0 and step + 1 < steps:
            nats, cnt = eval_fn(model, held_t, cfg["ctx"], cfg["batch"])
            heldout_curve.append([step + 1, round(nats / cnt, 4)])
    return {"loss_curve": curve, "heldout_curve": heldout_curve, "loss_curve_every": curve_every,
            "train_seconds": round(time.time() - t0, 1)}


def _run(args, t_start: float) -> dict:
    import transformers

    cfg = dict(nano.SIZES[args.size])
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.out
    dirs = {"baseline": out / "baseline", "engram": out / "engram"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    corpus = collect_corpus(SPLIT_SEED, max_files=args.max_files)
    fp = corpus.fingerprint
    print(f"corpus: {fp['train_files']} train files, {fp['heldout_files']} held-out, sha256 {fp['sha256'][:16]}",
          flush=True)
    tok = nano.train_tokenizer(corpus.train_files, cfg["vocab"])
    for d in dirs.values():
        ids = nano.save_tokenizer(tok, d, cfg["ctx"])
    train_np = nano.encode_files(tok, corpus.train_files, ids[nano.EOS], "tokenising train")
    held_np = nano.encode_files(tok, corpus.heldout_files, ids[nano.EOS], "tokenising held-out")
    train_t = torch.from_numpy(train_np.astype(np.int64)).to(device)
    held_t = torch.from_numpy(held_np.astype(np.int64)).to(device)
    held_bytes = sum(len(read_text(p).encode()) for p in corpus.heldout_files)
    canon = make_canonical(dirs["engram"], cfg["vocab"])
    ecfg = engram_config(args, canon.num_canonical)
    hasher = NgramHasher(ecfg, canon.table, canon.num_canonical)
    print(f"tokens: train {len(train_np)}, held-out {len(held_np)}; canonical ids {canon.num_canonical} of "
          f"{cfg['vocab']} ({time.time() - t_start:.1f}s)", flush=True)

    def make_baseline():
        m = nano.build_model(cfg, ids, args.attn).to(device)
        return m, nano.make_optimizer(m, cfg["lr"], cfg["wd"], device)

    def make_engram(gen_seed: int = 12345):
        m = EngramLlama(nano.build_model(cfg, ids, args.attn), ecfg, hasher)
        m.reset_engram(torch.Generator().manual_seed(gen_seed))
        m = m.to(device)
        return m, make_engram_optimizer(m, cfg["lr"], cfg["wd"], device, args.engram_lr_mult,
                                                args.engram_wd)

    steps_fit = None
    if args.steps:
        steps = args.steps
    else:
        step_b = _measure(make_baseline, nano.train_step, cfg, train_t, device)
        step_e = _measure(make_engram, engram_train_step, cfg, train_t, device)
        avail = args.minutes * 60.0 - (time.time() - t_start) - 30.0
        steps = steps_fit = max(1, int(avail / (1.25 * (step_b + step_e))))   # 25% for evals and saving
        steps = steps // 100 * 100 if steps >= 1000 else steps
        print(f"measured {step_b * 1e3:.1f} / {step_e * 1e3:.1f} ms/step (baseline / engram) -> {steps} steps fit",
              flush=True)
        if cfg["epochs"]:
            steps = min(steps, max(1, round(cfg["epochs"] * len(train_np) / (cfg["batch"] * cfg["ctx"]))))
            print(f"epoch cap {cfg['epochs']} -> {steps} steps", flush=True)

    results = {}
    for name in ("baseline", "engram"):
        random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
        if name == "baseline":
            model, opt = make_baseline()
            step_fn, eval_fn = nano.train_step, nano.evaluate
        else:                                   # same backbone init: same global seed before build_model
            model, opt = make_engram(args.seed + 7919)
            step_fn, eval_fn = engram_train_step, engram_evaluate
        res = _train(name, model, opt, step_fn, eval_fn, train_t, held_t, cfg, steps, args.seed, args.evals)
        model = model.to(torch.bfloat16).eval()  # numbers below are for the bf16 weights that are saved
        nats, cnt = eval_fn(model, held_t, cfg["ctx"], cfg["batch"])
        prompt = tok.encode(nano.SAMPLE_PROMPT, add_special_tokens=False).ids
        sample = nano.SAMPLE_PROMPT + tok.decode(greedy(model, prompt, 64, device), skip_special_tokens=False)
        if name == "baseline":
            model.save_pretrained(dirs[name], safe_serialization=True)
            params = {"total": sum(p.numel() for p in model.parameters()), "engram": 0}
        else:
            save_engram_model(model, dirs[name])
            eng = model.engram_params()
            params = {"total": sum(p.numel() for p in model.parameters()), "engram": eng,
                      "engram_tables": sum(m.table.weight.numel() for m in model.engram.values())}
            params["backbone"] = params["total"] - eng
        res.update({
            "params": params, "heldout_loss": round(nats / cnt, 4), "heldout_ppl": round(math.exp(nats / cnt), 3),
            "heldout_bits_per_byte": round(nats / math.log(2) / held_bytes, 4), "heldout_tokens": int(cnt),
            "safetensors_bytes": (dirs[name] / "model.safetensors").stat().st_size, "sample": sample,
        })
        (dirs[name] / "train_meta.json").write_text(json.dumps(res, indent=1) + "\n")
        print(f"[{name}] held-out loss {res['heldout_loss']} ppl {res['heldout_ppl']} "
              f"bpb {res['heldout_bits_per_byte']}; {params['total']:,} params", flush=True)
        results[name] = res
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()

    E, C = ecfg.engram_dim, cfg["hidden"]
    meta = {
        "size": args.size, "config": cfg, "seed": args.seed, "steps": steps, "steps_fit": steps_fit,
        "tokens_seen": steps * cfg["batch"] * cfg["ctx"], "train_tokens": len(train_np),
        "epochs": round(steps * cfg["batch"] * cfg["ctx"] / len(train_np), 2),
        "engram": ecfg.to_dict(), "engram_lr_mult": args.engram_lr_mult, "engram_wd": args.engram_wd,
        "engram_table_std": TABLE_STD,
        "engram_extra_matmul_flops_per_token": 2 * len(ecfg.layers) * (ecfg.hc_mult * C * E + C * E),
        "canonical_ids": canon.num_canonical,
        "heldout_loss": {n: r["heldout_loss"] for n, r in results.items()},
        "heldout_bits_per_byte": {n: r["heldout_bits_per_byte"] for n, r in results.items()},
        "params": {n: r["params"] for n, r in results.items()},
        "delta_heldout_loss": round(results["engram"]["heldout_loss"] - results["baseline"]["heldout_loss"], 4),
        "seconds": round(time.time() - t_start, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
        "corpus": fp, "runs": results,
    }
    (out / "engram_vs_baseline.json").write_text(json.dumps(meta, indent=1) + "\n")
    plot_curves(meta, out / "engram_vs_baseline.png")
    print(f"engram - baseline held-out loss: {meta['delta_heldout_loss']:+.4f} nats/token; {meta['seconds']}s",
          flush=True)
    size = results["engram"]["safetensors_bytes"]
    if args.size == "nano" and size > MAX_ENGRAM_FILE:
        raise RuntimeError(f"{dirs['engram']}/model.safetensors holds {size} bytes > 16 MiB")
    return meta


def plot_curves(meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, color in (("baseline", "tab:blue"), ("engram", "tab:orange")):
        r = meta["runs"][name]
        xs, ys = zip(*r["loss_curve"])
        ax.plot(xs, ys, color=color, lw=1.2, label=f"{name} train")
        pts = r["heldout_curve"] + [[meta["steps"], r["heldout_loss"]]]
        hx, hy = zip(*pts)
        ax.plot(hx, hy, "o--", color=color, ms=3, lw=0.8,
                label=f"{name} held-out (final {r['heldout_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"tierserve-{meta['size']}: Engram vs baseline ({meta['tokens_seen']:,} tokens, seed {meta['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
