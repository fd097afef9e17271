"""tierserve-nano training script: a tiny-size run end to end on a corpus subset (CPU, ~30 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[2]


def test_corpus_split_is_deterministic_and_stdlib_only():
    from tierserve.train import corpus

    a, b = corpus.collect_corpus(), corpus.collect_corpus()
    assert a.fingerprint == b.fingerprint and a.fingerprint["sha256"]
    assert a.train_files and a.heldout_files
    assert not set(a.train_files) & set(a.heldout_files)
    frac = len(a.heldout_files) / (len(a.train_files) + len(a.heldout_files))
    assert 0.005 < frac < 0.05
    for p in a.train_files + a.heldout_files:
        parts = Path(a.rel(p)).parts
        assert not {"test", "tests", "idlelib", "site-packages"} & set(parts[:-1]), p
        assert p.stat().st_size <= corpus.MAX_FILE_BYTES
    assert [a.rel(p) for p in a.train_files] == sorted(a.rel(p) for p in a.train_files)
    assert corpus.heldout_text().startswith(corpus.read_text(a.heldout_files[0]))
    # the module itself needs only the stdlib (loaded by path: the tierserve package imports torch)
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('c', sys.argv[1]); "
            "m = sys.modules['c'] = u.module_from_spec(s); s.loader.exec_module(m); m.collect_corpus(max_files=5); "
            "assert not {'torch', 'numpy', 'tierserve'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code, corpus.__file__], check=True, cwd="/")


def test_train_tiny_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "tierserve.train.nano", "--out", str(out), "--size", "tiny",
           "--device", "cpu", "--steps", "30", "--max-files", "60", "--seed", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "train_meta.json", "README.md"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "train_meta.json").read_text())
    for key in ("size", "params", "steps", "tokens_seen", "seconds", "device", "torch", "transformers",
                "seed", "heldout_loss", "heldout_ppl", "heldout_bits_per_byte", "train_loss_sample",
                "corpus", "loss_curve", "sample"):
        assert key in meta, key
    assert meta["steps"] == 30 and meta["size"] == "tiny" and meta["seed"] == 0
    assert meta["tokens_seen"] == 30 * meta["config"]["batch"] * meta["config"]["ctx"]
    assert meta["corpus"]["max_files"] == 60 and len(meta["corpus"]["sha256"]) == 64
    curve = [loss for _, loss in meta["loss_curve"]]
    assert min(curve[-5:]) < curve[0] - 0.5, curve
    assert meta["heldout_loss"] < curve[0]
    assert meta["sample"].startswith("def fibonacci(n):")
    assert sum(f.stat().st_size for f in out.iterdir()) <= 8 * 2**20

    gen_cfg = json.loads((out / "generation_config.json").read_text())
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [0, 2]
    assert tok_cfg["eos_token"] == tok_cfg["pad_token"] == "<|endoftext|>"

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    text = "def f(x):\n    return x + 1  # é\n"
    assert tok.decode(tok.encode(text).ids) == text

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    hf_tok = AutoTokenizer.from_pretrained(out)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([hf_tok("def f(x):").input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all()


def test_same_seed_same_weights(tmp_path):
    from tierserve.train import nano

    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        nano.main(["--out", str(out), "--size", "tiny", "--device", "cpu", "--steps", "5",
                   "--max-files", "20", "--seed", "3"])
        outs.append(out)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    ma, mb = (json.loads((o / "train_meta.json").read_text()) for o in outs)
    assert ma["loss_curve"] == mb["loss_curve"] and ma["heldout_loss"] == mb["heldout_loss"]
