"""Engram vs baseline training script (issue 9): a tiny run end to end on a corpus subset, and the engine
computing the same function as the training model (CPU, ~45 s)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch

ARGS = ["--size", "tiny", "--device", "cpu", "--steps", "20", "--max-files", "20", "--seed", "0",
        "--evals", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tierserve.train import engram_nano

    out = tmp_path_factory.mktemp("engram_nano") / "run"
    meta = engram_nano.main(["--out", str(out), *ARGS])
    return out, meta


def test_both_models_written_with_losses_and_curves(run):
    out, meta = run
    for d in ("baseline", "engram"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "train_meta.json"):
            assert (out / d / name).is_file(), f"{d}/{name}"
    assert (out / "engram_vs_baseline.png").stat().st_size > 1000
    j = json.loads((out / "engram_vs_baseline.json").read_text())
    assert j == json.loads(json.dumps(meta))
    assert j["steps"] == 20 and j["tokens_seen"] == 20 * j["config"]["batch"] * j["config"]["ctx"]
    for name in ("baseline", "engram"):
        r = j["runs"][name]
        assert 0 < j["heldout_loss"][name] == r["heldout_loss"] < r["loss_curve"][0][1]
        assert r["heldout_bits_per_byte"] > 0 and r["params"]["total"] > 0 and r["train_seconds"] >= 0
        assert len(r["loss_curve"]) == len(j["runs"]["baseline"]["loss_curve"])
    p = j["params"]
    assert p["engram"]["backbone"] == p["baseline"]["total"] and p["engram"]["engram"] > 0
    assert p["engram"]["total"] == p["baseline"]["total"] + p["engram"]["engram"]
    # same backbone init, value_proj = 0 and the same first batch: step 1 is the same function on the same data
    b, e = (j["runs"][n]["loss_curve"] for n in ("baseline", "engram"))
    assert b[0] == e[0] and b[1:] != e[1:]
    cfg = json.loads((out / "engram" / "config.json").read_text())
    assert cfg["engram"]["layers"] == [1] and cfg["engram"]["conv_kernel_size"] == 0
    assert cfg["engram"]["canonical_vocab_size"] == j["canonical_ids"]
    assert "engram" not in json.loads((out / "baseline" / "config.json").read_text())


def test_engine_runs_the_trained_function(run):
    """Greedy logprobs of our engine = a direct fp32 forward of the training model (transformers + hooks)."""
    from tierserve import LLM, SamplingParams
    from tierserve.train.engram_nano import load_engram_model

    out, _ = run
    path = out / "engram"
    llm = LLM(str(path), device="cpu", dtype="float32")
    assert llm.engine.runner.model.layers[1].engram is not None
    prompt = llm.engine.tokenizer.encode("def fibonacci(n):\n    if n <", add_special_tokens=False)
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0))
    toks = o[0].outputs[0].token_ids
    assert len(toks) == 8
    lps = [lp[t] for lp, t in zip(o[0].outputs[0].logprobs, toks)]

    model = load_engram_model(path)
    ids = torch.tensor([prompt + toks])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
    n = len(prompt)
    ref = [logp[n - 1 + i, t].item() for i, t in enumerate(toks)]
    assert max(abs(a - b) for a, b in zip(lps, ref)) < 1e-4, (lps, ref)
    assert toks == logp[n - 1:-1].argmax(-1).tolist()

    # the Engram path matters: without its value projection the function differs
    with torch.no_grad():
        for m in model.engram.values():
            m.value_proj.weight.zero_()
        plain = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
    assert (plain - logp).abs().max() > 1e-3

    base = LLM(str(out / "baseline"), device="cpu", dtype="float32")
    assert len(base.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
               .outputs[0].token_ids) == 8


def test_same_seed_same_weights(run, tmp_path):
    from tierserve.train import engram_nano

    out, meta = run
    again = engram_nano.main(["--out", str(tmp_path / "again"), *ARGS])
    for d in ("baseline", "engram"):
        assert (out / d / "model.safetensors").read_bytes() == (tmp_path / "again" / d / "model.safetensors").read_bytes()
    assert again["runs"]["engram"]["loss_curve"] == meta["runs"]["engram"]["loss_curve"]
    assert again["heldout_loss"] == meta["heldout_loss"]


def _tiny_model(hidden=32, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tierserve.memory.engram_config import EngramConfig
    from tierserve.memory.engram_hash import NgramHasher
    from tierserve.train.engram_nano import EngramLlama

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, tie_word_embeddings=True)
    conf._attn_implementation = "eager"
    ecfg = EngramConfig(layers=(0, 1), heads_per_order=2, dim_per_head=8, table_size=101)
    model = EngramLlama(LlamaForCausalLM(conf), ecfg, NgramHasher(ecfg, torch.arange(vocab)))
    model.reset_engram(torch.Generator().manual_seed(1))
    return model


def test_table_trains_and_gather_matches_the_engine_path():
    model = _tiny_model()
    with torch.no_grad():
        for m in model.engram.values():
            m.value_proj.weight.normal_(0, 0.1)
    x = torch.randint(0, 64, (3, 12))
    model.history = torch.tensor([[-1, -1], [5, 6], [-1, 7]])
    model(input_ids=x, use_cache=False).logits.sum().backward()
    for i, m in model.engram.items():
        g = m.table.weight.grad
        assert g is not None and g.abs().sum() > 0, i
        touched = model._rows[int(i)].unique()
        assert (g.abs().sum(1) > 0).nonzero().view(-1).tolist() == touched.tolist()
        # the training gather (an embedding over the table parameter) = EngramTable.gather, the engine's path
        emb = torch.nn.functional.embedding(model._rows[int(i)], m.table.weight).reshape(x.numel(), -1)
        assert torch.equal(emb, m.table.gather(model._rows[int(i)]))
    # look-back: the rows of a window = the rows of the same tokens hashed inside a longer sequence
    seq = torch.randint(0, 64, (1, 20))
    model(input_ids=seq, use_cache=False)
    full = model._rows[1].view(20, -1)
    model.history = seq[:, 6:8]
    model(input_ids=seq[:, 8:], use_cache=False)
    assert torch.equal(model._rows[1], full[8:])


def test_nano_engram_checkpoint_fits_16_mib():
    from types import SimpleNamespace

    from tierserve.memory.engram_hash import NgramHasher
    from tierserve.train import nano
    from tierserve.train.engram_nano import ENGRAM_LR_MULT, EngramLlama, engram_config

    cfg = nano.SIZES["nano"]
    args = SimpleNamespace(size="nano", seed=0, engram_layers=None, engram_heads=None, engram_dim=None,
                           engram_rows=None, engram_lr_mult=ENGRAM_LR_MULT)
    ecfg = engram_config(args, cfg["vocab"])
    model = EngramLlama(nano.build_model(cfg, {nano.EOS: 0, nano.IM_START: 1, nano.IM_END: 2}), ecfg, NgramHasher(ecfg, torch.arange(cfg["vocab"])))
    n = sum(p.numel() for p in model.parameters())                     # tied embedding counted once
    assert 1 <= len(ecfg.layers) <= 2 and ecfg.conv_kernel_size == 0
    assert model.engram_params() > 0.8 * (n - model.engram_params())   # Engram ~doubles the parameters
    assert n * 2 + 64 * 1024 <= 16 * 2**20                              # bf16 + header
