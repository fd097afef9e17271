"""Train tierserve-nano, the embedded default model: a small Llama trained on the Python stdlib.

    python -m tierserve.train.nano --out DIR [--device cuda|cpu] [--size nano|tiny] [--seed 0]
        [--minutes 8] [--steps N] [--epochs E] [--max-files N] [--batch B] [--lr LR] [--weight-decay WD]
        [--attn eager|sdpa]

Dev-time only (uses transformers). Deterministic given (seed, step count): without ``--steps`` the step
count is what fits in ``--minutes`` (timed on 20 steps of a throw-away model, after which training starts
from a fresh seeded state), capped at ``--epochs`` passes over the data; it is recorded in train_meta.json.
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
import torch.nn.functional as F

from tierserve.train.corpus import SPLIT_SEED, collect_corpus, read_text

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
MAX_DIR_BYTES = 8 * 1024 * 1024
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
                 " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# nano: the stdlib gives only ~2.6-2.9M training tokens, so a time-filling run (~12k steps x 64 x 1024 on an
# H200, ~310 epochs) memorises it (train loss 0.07, held-out 8.7). Measured on an H200: held-out loss bottoms
# out around 6-10 epochs; batch 16 with weight decay 1.0 and an 8-epoch cap gave the best held-out loss (2.35
# vs 2.51 at wd 0.1, 2.89 at batch 32, 2.94 at batch 64). --epochs 0 restores the pure time budget.
SIZES = {
    "nano": dict(hidden=256, layers=4, heads=8, kv_heads=2, inter=704, vocab=4096, ctx=1024,
                 batch=16, lr=3e-3, warmup=200, wd=1.0, epochs=8.0),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=512, ctx=128,
                 batch=16, lr=1e-2, warmup=20, wd=0.1, epochs=0),
}
SAMPLE_PROMPT = "def fibonacci(n):"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tierserve.train.nano", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (HF layout)")
    ap.add_argument("--device", default=None, help="cuda|cpu (default: cuda if available)")
    ap.add_argument("--size", choices=sorted(SIZES), default="nano")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget for the whole run")
    ap.add_argument("--steps", type=int, default=None, help="force the step count (else from --minutes)")
    ap.add_argument("--max-files", type=int, default=None, help="use a subset of the corpus (tests)")
    ap.add_argument("--batch", type=int, default=None, help="override the size's batch (sequences)")
    ap.add_argument("--lr", type=float, default=None, help="override the size's peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=None, help="override the size's weight decay")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                    help="eager is bitwise deterministic on CUDA; sdpa (cuDNN attention backward) is not")
    ap.add_argument("--epochs", type=float, default=None,
                    help="cap on passes over the training tokens when --steps is not given (0: no cap)")
    return ap.parse_args(argv)


def train_tokenizer(files, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=sys.stderr.isatty())
    tok.train_from_iterator((read_text(p) for p in files), trainer, length=len(files))
    return tok


def save_tokenizer(tok, out: Path, ctx: int) -> dict[str, int]:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in (EOS, IM_START, IM_END)}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in ids.items()}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOS,
           "pad_token": EOS, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
           "model_max_length": ctx, "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return ids


def encode_files(tok, files, eos_id: int, desc: str, chunk: int = 32) -> np.ndarray:
    """Token stream ``[eos, doc0, eos, doc1, eos, ...]`` (every document is followed by eos)."""
    from rich.progress import Progress

    parts = [np.array([eos_id], dtype=np.int32)]
    with Progress(transient=True, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task(desc, total=len(files))
        for i in range(0, len(files), chunk):
            batch = files[i:i + chunk]
            for enc in tok.encode_batch([read_text(p) for p in batch], add_special_tokens=False):
                parts.append(np.asarray(enc.ids, dtype=np.int32))
                parts.append(np.array([eos_id], dtype=np.int32))
            prog.advance(task, len(batch))
    return np.concatenate(parts)


def build_model(cfg: dict, ids: dict[str, int], attn: str = "eager"):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       num_key_value_heads=cfg["kv_heads"], head_dim=cfg["hidden"] // cfg["heads"],
                       max_position_embeddings=cfg["ctx"], rms_norm_eps=1e-5, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       bos_token_id=None, eos_token_id=ids[EOS], pad_token_id=ids[EOS])
    conf._attn_implementation = attn
    model = LlamaForCausalLM(conf)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[ids[EOS], ids[IM_END]],
                                               pad_token_id=ids[EOS])
    return model


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    warmup = max(1, min(warmup, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model, lr: float, wd: float, device: torch.device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lm_loss(model, x, y, reduction: str = "mean"):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction)


def windows(stream: torch.Tensor, starts: torch.Tensor, ctx: int):
    idx = starts.to(stream.device)[:, None] + torch.arange(ctx + 1, device=stream.device)
    w = stream[idx]
    return w[:, :-1], w[:, 1:]


def train_step(model, opt, stream, gen, cfg, lr: float, before_forward=None):
    """One step on random windows; ``before_forward(starts)`` lets a caller attach per-window state
    (e.g. Engram's look-back tokens). Param groups may carry an ``lr_mult``."""
    starts = torch.randint(0, len(stream) - cfg["ctx"] - 1, (cfg["batch"],), generator=gen)
    x, y = windows(stream, starts, cfg["ctx"])
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    if before_forward is not None:
        before_forward(starts)
    loss = lm_loss(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, ctx: int, batch: int) -> tuple[float, int]:
    """Sum of next-token nats over non-overlapping windows; every token after the first is scored once."""
    was = model.training
    model.eval()
    n = len(stream) - 1
    starts = torch.arange(0, n, ctx)
    full, tail = starts[starts + ctx <= n], starts[starts + ctx > n]
    total, count = 0.0, 0
    for i in range(0, len(full), batch):
        x, y = windows(stream, full[i:i + batch], ctx)
        total += lm_loss(model, x, y, "sum").item()
        count += y.numel()
    for s in tail.tolist():  # the last, shorter window
        total += lm_loss(model, stream[None, s:n], stream[None, s + 1:n + 1], "sum").item()
        count += n - s
    model.train(was)
    return total, count


def time_steps(step_fn, model, opt, stream, cfg, device, warmup: int = 5, n: int = 20) -> float:
    """Seconds per training step: mean of ``n`` after ``warmup`` (fixed window draws)."""
    gen = torch.Generator().manual_seed(12345)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step_fn(model, opt, stream, gen, cfg, 1e-4)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step_fn(model, opt, stream, gen, cfg, 1e-4)
    sync()
    return (time.perf_counter() - t) / n


def measure(cfg, stream, heldout, ids, device, attn) -> tuple[float, float]:
    """Seconds per training step (mean of 20 after 5 warm-up) and per held-out eval, throw-away model."""
    model = build_model(cfg, ids, attn).to(device)
    opt = make_optimizer(model, cfg["lr"], cfg["wd"], device)
    step_s = time_steps(train_step, model, opt, stream, cfg, device)
    t = time.perf_counter()
    evaluate(model, heldout, cfg["ctx"], cfg["batch"])
    return step_s, time.perf_counter() - t


def run_deterministic(run, args) -> dict:
    """Call ``run(args, t_start)`` with deterministic algorithms on (restored afterwards)."""
    t_start = time.time()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return run(args, t_start)
    finally:
        torch.use_deterministic_algorithms(prev_det)


def main(argv=None) -> dict:
    return run_deterministic(_run, parse_args(argv))


def _run(args, t_start: float) -> dict:
    import tokenizers
    import transformers

    cfg = dict(SIZES[args.size])
    for key, val in (("batch", args.batch), ("lr", args.lr), ("wd", args.weight_decay), ("epochs", args.epochs)):
        if val is not None:
            cfg[key] = val
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget_s = args.minutes * 60.0
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = collect_corpus(SPLIT_SEED, max_files=args.max_files)
    fp = corpus.fingerprint
    print(f"corpus: {fp['train_files']} train files ({fp['train_bytes']} B), "
          f"{fp['heldout_files']} held-out ({fp['heldout_bytes']} B), sha256 {fp['sha256'][:16]}", flush=True)
    tok = train_tokenizer(corpus.train_files, cfg["vocab"])
    ids = save_tokenizer(tok, out, cfg["ctx"])
    train_np = encode_files(tok, corpus.train_files, ids[EOS], "tokenising train")
    held_np = encode_files(tok, corpus.heldout_files, ids[EOS], "tokenising held-out")
    train_t = torch.from_numpy(train_np.astype(np.int64)).to(device)
    held_t = torch.from_numpy(held_np.astype(np.int64)).to(device)
    print(f"tokens: train {len(train_np)}, held-out {len(held_np)} ({time.time() - t_start:.1f}s)", flush=True)

    if args.steps:
        steps, step_s, eval_s = args.steps, None, None
    else:
        step_s, eval_s = measure(cfg, train_t, held_t, ids, device, args.attn)
        avail = budget_s - (time.time() - t_start) - 15.0 - 12 * eval_s
        steps = max(1, int(avail / step_s))
        steps = steps // 100 * 100 if steps >= 1000 else steps
        print(f"measured {step_s * 1e3:.1f} ms/step, {eval_s:.2f} s/eval -> {steps} steps fit", flush=True)
        if cfg["epochs"]:
            steps = min(steps, max(1, round(cfg["epochs"] * len(train_np) / (cfg["batch"] * cfg["ctx"]))))
            print(f"epoch cap {cfg['epochs']} -> {steps} steps", flush=True)

    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    model = build_model(cfg, ids, args.attn).to(device)
    model.train()
    opt = make_optimizer(model, cfg["lr"], cfg["wd"], device)
    gen = torch.Generator().manual_seed(args.seed)
    curve_every = max(1, min(50, steps // 200))
    print_every = 100 if steps >= 1000 else max(1, steps // 10)
    eval_every = max(1, steps // 10)
    curve, heldout_curve, acc, acc_n, stopped_by = [], [], None, 0, "steps"
    t_train = time.time()
    step = 0
    for step in range(steps):
        loss = train_step(model, opt, train_t, gen, cfg, lr_at(step, steps, cfg["lr"], cfg["warmup"]))
        acc = loss if acc is None else acc + loss
        acc_n += 1
        if (step + 1) % curve_every == 0 or step + 1 == steps:
            curve.append([step + 1, round(acc.item() / acc_n, 4)])
            acc, acc_n = None, 0
        if (step + 1) % print_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {curve[-1][1]:.4f} "
                  f"({time.time() - t_train:.0f}s)", flush=True)
        if (step + 1) % eval_every == 0 and step + 1 < steps:
            nats, cnt = evaluate(model, held_t, cfg["ctx"], cfg["batch"])
            heldout_curve.append([step + 1, round(nats / cnt, 4)])
        if time.time() - t_start > budget_s and step + 1 < steps:
            stopped_by = "time"
            print(f"time budget hit at step {step + 1}", flush=True)
            break
    steps_done = step + 1
    train_s = time.time() - t_train

    model = model.to(torch.bfloat16).eval()  # numbers below are for the bf16 weights that are saved
    nats, cnt = evaluate(model, held_t, cfg["ctx"], cfg["batch"])
    held_bytes = sum(len(read_text(p).encode()) for p in corpus.heldout_files)
    sgen = torch.Generator().manual_seed(args.seed + 1)
    n_sample = max(4, min(256, cnt // cfg["ctx"]))
    x, y = windows(train_t, torch.randint(0, len(train_t) - cfg["ctx"] - 1, (n_sample,), generator=sgen),
                   cfg["ctx"])
    with torch.no_grad():
        train_loss = sum(lm_loss(model, x[i:i + cfg["batch"]], y[i:i + cfg["batch"]], "sum").item()
                         for i in range(0, n_sample, cfg["batch"])) / y.numel()
    prompt = tok.encode(SAMPLE_PROMPT, add_special_tokens=False).ids
    with torch.no_grad():
        gen_ids = model.generate(torch.tensor([prompt], device=device), max_new_tokens=64, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device))
    sample = SAMPLE_PROMPT + tok.decode(gen_ids[0, len(prompt):].tolist(), skip_special_tokens=False)

    model.save_pretrained(out, safe_serialization=True)
    meta = {
        "model": "tierserve-nano" if args.size == "nano" else f"tierserve-nano-{args.size}",
        "size": args.size, "config": cfg, "params": sum(p.numel() for p in model.parameters()),
        "seed": args.seed, "steps": steps_done, "steps_planned": steps, "stopped_by": stopped_by,
        "measured_step_s": step_s, "tokens_seen": steps_done * cfg["batch"] * cfg["ctx"],
        "train_tokens": int(len(train_np)), "heldout_tokens": int(cnt),
        "epochs": round(steps_done * cfg["batch"] * cfg["ctx"] / len(train_np), 2),
        "seconds": round(time.time() - t_start, 1), "train_seconds": round(train_s, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__, "python": sys.version.split()[0],
        "heldout_loss": round(nats / cnt, 4), "heldout_ppl": round(math.exp(nats / cnt), 3),
        "heldout_bits_per_byte": round(nats / math.log(2) / held_bytes, 4),
        "train_loss_sample": round(train_loss, 4), "weights_dtype": "bfloat16", "attn": args.attn,
        "special_tokens": ids, "corpus": fp, "loss_curve_every": curve_every,
        "loss_curve": curve, "heldout_curve": heldout_curve, "sample_prompt": SAMPLE_PROMPT, "sample": sample,
    }
    (out / "train_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_readme(out, meta)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"held-out loss {meta['heldout_loss']} ppl {meta['heldout_ppl']} bpb {meta['heldout_bits_per_byte']}; "
          f"train loss {meta['train_loss_sample']}; {total / 2**20:.2f} MiB in {out}; {meta['seconds']}s", flush=True)
    print("sample:", sample, flush=True)
    if total > MAX_DIR_BYTES:
        raise RuntimeError(f"{out} holds {total} bytes > {MAX_DIR_BYTES} (8 MiB)")
    return meta


def write_readme(out: Path, m: dict) -> None:
    c, fp = m["config"], m["corpus"]
    text = f"""# {m['model']}

A tiny Llama-architecture causal LM ({m['params']:,} parameters, bf16 safetensors), the default model
embedded in tierserve for tests, demos and the eval suite. It was trained from scratch by
`python -m tierserve.train.nano` on the `.py` files of the Python {fp['python_version']} standard library
(tests, idlelib and site-packages excluded). It is **not instruction-tuned**: it continues Python source.
The ChatML template and `<|im_start|>`/`<|im_end|>` tokens exist only so chat code paths can be exercised.

| | |
| --- | --- |
| architecture | LlamaForCausalLM: hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV heads, MLP {c['inter']}, tied embeddings |
| tokenizer | byte-level BPE, vocab {c['vocab']}, `<|endoftext|>` = eos / separator / pad, no BOS |
| context | {c['ctx']} tokens (RoPE theta 10000) |
| training | {m['steps']} steps x {c['batch']} x {c['ctx']} tokens = {m['tokens_seen']:,} tokens ({m['epochs']} epochs), AdamW lr {c['lr']} cosine, seed {m['seed']} |
| hardware | {m['device']}, {m['train_seconds']} s training, {m['seconds']} s total |
| corpus | {fp['train_files']} train files / {fp['heldout_files']} held-out files (split by path hash), sha256 `{fp['sha256'][:16]}` |
| held-out loss | {m['heldout_loss']} nats/token, perplexity {m['heldout_ppl']}, {m['heldout_bits_per_byte']} bits/byte |
| train loss (sample) | {m['train_loss_sample']} |

Greedy sample for `{m['sample_prompt']}`:

```python
{m['sample']}
```

All numbers come from `train_meta.json` (torch {m['torch']}, transformers {m['transformers']}).
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
