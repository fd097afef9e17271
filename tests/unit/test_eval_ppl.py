"""tierserve eval ppl: windows, engine-settings strings, perplexity equal to a direct computation with the model
(transformers, fp32 on CPU), --compare rows."""
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tierserve.eval import ppl as P
from tierserve.eval.client import LocalGenerator
from tierserve.eval.settings import label, parse_settings
from tierserve.loader.hf import DEFAULT_MODEL
from tierserve.loader.tokenizer import Tokenizer

DOC = textwrap.dedent(textwrap.__doc__ or "") + Path(textwrap.__file__).read_text(encoding="utf-8")[:1500]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def direct_ppl(path, docs, context, stride):
    """The Hugging Face sliding-window recipe, on transformers' own model: exp(mean NLL), bits per byte."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(path)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_ids[0]
    nll, count, n_bytes = 0.0, 0, 0
    for text in docs:
        ids = torch.tensor([start] + tok.encode(text, add_special_tokens=False))
        n_bytes += len(text.encode())
        prev_end = 0
        for begin in range(0, len(ids), stride):
            end = min(begin + context, len(ids))
            trg = end - prev_end
            with torch.no_grad():
                logits = model(ids[None, begin:end]).logits[0].double()
            lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[begin + 1:end, None])[:, 0]
            scored = lp[-trg:] if begin > 0 else lp     # the first window scores everything but position 0
            nll -= scored.sum().item()
            count += scored.numel()
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / count), nll / math.log(2) / n_bytes, count


@pytest.mark.parametrize("n, context, stride", [(2, 8, 2), (10, 4, 1), (100, 16, 4), (100, 16, 15), (17, 32, 8)])
def test_windows_score_every_position_once(n, context, stride):
    seen = []
    for i, (b, e, s) in enumerate(P.windows(n, context, stride)):
        assert 0 <= b < s < e <= n and e - b <= context
        if i > 0:
            assert s - b >= context - stride          # every later token keeps >= context - stride of context
        seen += range(s, e)
    assert seen == list(range(1, n))


def test_windows_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        P.windows(10, 8, 8)


def test_parse_settings_types_and_errors():
    assert parse_settings("") == {} and parse_settings("default") == {}
    got = parse_settings("max_num_batched_tokens=32, page-size=8,enable_prefix_caching=false,"
                         "gpu_memory_utilization=0.5,num_kv_pages=none,dtype=float32")
    assert got == {"max_num_batched_tokens": 32, "page_size": 8, "enable_prefix_caching": False,
                   "gpu_memory_utilization": 0.5, "num_kv_pages": None, "dtype": "float32"}
    assert label(got).startswith("max-num-batched-tokens=32,page-size=8,enable-prefix-caching=false")
    with pytest.raises(ValueError, match="unknown engine setting 'no_such_thing'"):
        parse_settings("no_such_thing=1")
    with pytest.raises(ValueError, match="page_size must be an integer"):
        parse_settings("page_size=eight")
    with pytest.raises(ValueError, match="name=value"):
        parse_settings("page_size")


def test_ppl_equals_direct_computation(ckpt):
    gen = LocalGenerator(str(ckpt), dtype="float32", device="cpu", max_model_len=256)
    docs = [("a", DOC), ("b", "def f(x):\n    return x * 2\n")]
    r = P.evaluate(gen, docs, context=64, stride=16)
    ppl, bpb, count = direct_ppl(ckpt, [t for _, t in docs], 64, 16)
    assert r.tokens == count
    assert r.ppl == pytest.approx(ppl, rel=1e-4)
    assert r.bits_per_byte == pytest.approx(bpb, rel=1e-4)
    assert r.bytes == sum(len(t.encode()) for _, t in docs)


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason="tierserve-nano is not in assets yet")
def test_ppl_on_nano_equals_direct_computation():
    from tierserve.train.corpus import heldout_documents

    docs = [t[:3000] for t in heldout_documents()[:2]]
    gen = LocalGenerator(None, dtype="float32", device="cpu")
    r = P.evaluate(gen, [(str(i), t) for i, t in enumerate(docs)], context=256, stride=64)
    ppl, bpb, count = direct_ppl(DEFAULT_MODEL, docs, 256, 64)
    assert r.tokens == count
    assert r.ppl == pytest.approx(ppl, rel=1e-4)
    assert r.bits_per_byte == pytest.approx(bpb, rel=1e-4)


def test_compare_one_row_per_setting(ckpt, tmp_path):
    from typer.testing import CliRunner

    from tierserve.cli import app

    data = tmp_path / "doc.txt"
    data.write_text(DOC[:1200])
    out = tmp_path / "ppl.json"
    res = CliRunner().invoke(app, ["eval", "ppl", "--model", str(ckpt), "--data", str(data), "--device", "cpu",
                                   "--dtype", "float32", "--max-model-len", "128", "--context", "64", "--stride", "32",
                                   "--compare", "", "max_num_batched_tokens=32,page_size=8",
                                   "enable_prefix_caching=false",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["meta"]["tool"] == "tierserve eval" and rep["meta"]["subcommand"] == "ppl"
    assert {"settings", "versions", "device", "date"} <= set(rep["meta"])
    rows = rep["rows"]
    assert [r["setting"] for r in rows] == ["default", "max-num-batched-tokens=32,page-size=8",
                                            "enable-prefix-caching=false"]
    assert rows[0]["delta_ppl_pct"] == 0.0
    for r in rows[1:]:          # chunked prefill, page size and prefix caching are lossless
        assert abs(r["delta_ppl_pct"]) < 1e-3 and r["tokens"] == rows[0]["tokens"]
    assert rep["summary"]["ppl"] == rows[0]["ppl"] and len(rep["summary"]["compare"]) == 3


def test_compare_unknown_setting_is_a_clear_error(ckpt, tmp_path):
    from typer.testing import CliRunner

    from tierserve.cli import app

    data = tmp_path / "doc.txt"
    data.write_text("x = 1\n")
    res = CliRunner().invoke(app, ["eval", "ppl", "--model", str(ckpt), "--data", str(data),
                                   "--compare", "", "kv_dtyp=fp8", "-o", str(tmp_path / "o.json")])
    assert res.exit_code == 2
    assert "unknown engine setting 'kv_dtyp'" in res.output
    assert not (tmp_path / "o.json").exists()


def test_nano_heldout_corpus():
    from tierserve.train.corpus import is_heldout

    docs = P.load_documents(corpus="nano-heldout", max_bytes=3000)
    assert docs and all(i.endswith(".py") and is_heldout(i) for i, _ in docs)
    assert 2990 < sum(len(t.encode()) for _, t in docs) <= 3000
    with pytest.raises(ValueError, match="nano-heldout"):
        P.load_documents(corpus="wikitext")


def test_load_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("three")
    docs = P.load_documents([tmp_path / "a.jsonl", tmp_path / "b.txt"], max_bytes=5)
    assert docs == [("a.jsonl:1", "one"), ("a.jsonl:3", "tw")]
    with pytest.raises(ValueError, match="no text"):
        P.load_documents([])
    with pytest.raises(FileNotFoundError):
        P.load_documents([tmp_path / "missing.txt"])
