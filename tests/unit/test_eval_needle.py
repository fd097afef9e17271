"""tierserve eval needle: prompt construction to a token budget, scoring, grid rows, heat map, CLI."""
import json
import re

import pytest

from tests.helpers.tiny_models import make_checkpoint
from tierserve.eval import needle as N
from tierserve.eval.client import Completion, Generator, LocalGenerator


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


class Oracle(Generator):
    """Answers with the passkey it finds in the prompt (or a wrong one): checks the scoring, not a model."""
    max_model_len = 4096

    def __init__(self, right=True):
        self.right = right

    def complete(self, prompts, params, chat=False, advance=lambda n: None):
        out = []
        for p in prompts:
            key = int(re.search(r"(?:pass key is|PASS_KEY = )(\d+)", p).group(1))
            out.append([Completion(f" {key if self.right else key + 1}. Next", "length")])
            advance(1)
        return out

    def score(self, prompts, advance=lambda n: None):
        raise NotImplementedError


@pytest.mark.parametrize("style", ["text", "code"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_fit_prompt_respects_budget_and_places_needle(style, depth):
    count = len                           # one "token" per character keeps this exact
    prompt, n = N.fit_prompt(N.STYLES[style], 2000, depth, 12345, count)
    assert n == len(prompt) <= 2000
    assert len(prompt) > 2000 - 2 * len(N.STYLES[style].filler(99))
    assert prompt.endswith(N.STYLES[style].question) and "12345" in prompt
    at = prompt.index("12345") / len(prompt)
    assert abs(at - depth) < 0.1


def test_answer_ok():
    assert N.answer_ok(" 12345. Remember", 12345)
    assert not N.answer_ok(" 123456", 12345) and not N.answer_ok("none", 12345)
    assert not N.answer_ok(" 1 and 12345", 12345)


@pytest.mark.parametrize("right", [True, False])
def test_grid_and_summary(right, tmp_path):
    rows, summary = N.run(Oracle(right), contexts=[256, 512, 8192], depths=[0.0, 1.0], trials=2, style="code")
    assert [r["id"] for r in rows] == ["ctx=256/depth=0.00", "ctx=256/depth=1.00", "ctx=512/depth=0.00",
                                       "ctx=512/depth=1.00"]
    assert summary["skipped_contexts"] == [8192]              # does not fit max_model_len 4096
    assert summary["accuracy"] == (1.0 if right else 0.0)
    assert all(r["trials"] == 2 for r in rows)
    png = N.heatmap(rows, tmp_path / "h.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_tiny_model_runs_and_cli_writes_heatmap(ckpt, tmp_path):
    gen = LocalGenerator(str(ckpt), dtype="float32", device="cpu", max_model_len=256)
    rows, summary = N.run(gen, contexts=[64, 200, 250], depths=[0.0, 1.0], trials=1, style="text", max_tokens=4)
    assert summary["skipped_contexts"] == [64]        # shorter than the bare question in this tiny vocabulary
    assert len(rows) == 4 and all(r["tokens"] <= r["context"] for r in rows)
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["lengths"] == "tokenizer"

    from typer.testing import CliRunner

    from tierserve.cli import app

    out = tmp_path / "needle.json"
    res = CliRunner().invoke(app, ["eval", "needle", "--model", str(ckpt), "--device", "cpu", "--dtype", "float32",
                                   "--max-model-len", "256", "--contexts", "200,250,1024", "--depths", "0,1",
                                   "--trials", "1", "--max-tokens", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert len(rep["rows"]) == 4 and rep["summary"]["skipped_contexts"] == [1024]
    assert (tmp_path / "needle-heatmap.png").is_file()


def test_bad_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="depths"):
        N.run(Oracle(), contexts=[256], depths=[1.5])
    with pytest.raises(ValueError, match="no context length fits"):
        N.run(Oracle(), contexts=[100000])
    with pytest.raises(ValueError, match="no context length"):
        N.run(Oracle(), contexts=[10])
    with pytest.raises(ValueError, match="style"):
        N.run(Oracle(), style="poetry")
