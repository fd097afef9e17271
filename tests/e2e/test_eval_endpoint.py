"""`tierserve eval ... --endpoint` against our own `tierserve serve` process (tiny checkpoint, CPU, fp32):
endpoint perplexity equals in-process perplexity, and humaneval / svg / needle run through the endpoint with the
same greedy completions as in-process."""
import json

import pytest
from typer.testing import CliRunner

from tests.helpers.tiny_models import make_checkpoint
from tierserve.cli import app
from tierserve.eval import humaneval as H
from tierserve.server.testing import ServerProcess

LOCAL = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256"]
KEY = "sk-eval-test"
NAME = "tiny-llama"          # a served name that is not a directory: no local tokenizer unless --tokenizer
TEXT = ("import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Print the arguments.\"\"\"\n"
        "    for a in argv[1:]:\n        print(a, file=sys.stdout)\n    return 0\n\n\n") * 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("evalsrv") / "llama", "llama")


@pytest.fixture(scope="module")
def server(ckpt):
    with ServerProcess(ckpt, *LOCAL, "--served-model-name", NAME, api_key=KEY) as s:
        yield s


def run(*args):
    res = CliRunner().invoke(app, ["eval", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res


def endpoint_args(server):
    return ["--endpoint", server.url, "--model", NAME, "--api-key", KEY]


def test_endpoint_ppl_equals_in_process(server, ckpt, tmp_path):
    data = tmp_path / "doc.txt"
    data.write_text(TEXT)
    common = ["--data", data, "--context", "64", "--stride", "16"]
    run("ppl", *endpoint_args(server), "--tokenizer", ckpt, *common, "-o", tmp_path / "ep.json")
    run("ppl", "--model", ckpt, *LOCAL, *common, "-o", tmp_path / "local.json")
    ep, local = (json.loads((tmp_path / f).read_text()) for f in ("ep.json", "local.json"))
    assert ep["meta"]["device"] == {"kind": "endpoint", "url": server.url}
    assert ep["rows"][0]["engine"] == "endpoint" and local["rows"][0]["engine"] == "tierserve"
    assert ep["summary"]["tokens"] == local["summary"]["tokens"]
    assert ep["summary"]["ppl"] == pytest.approx(local["summary"]["ppl"], rel=1e-4)
    assert ep["summary"]["bits_per_byte"] == pytest.approx(local["summary"]["bits_per_byte"], rel=1e-4)


def test_endpoint_ppl_without_local_tokenizer(server, tmp_path):
    data = tmp_path / "doc.txt"
    data.write_text(TEXT)
    run("ppl", *endpoint_args(server), "--data", data, "--context", "64", "-o", tmp_path / "ep.json")
    rep = json.loads((tmp_path / "ep.json").read_text())
    assert rep["rows"][0]["approximate"] is True and rep["summary"]["ppl"] > 1


def test_wrong_api_key_is_a_clear_error(server, tmp_path):
    data = tmp_path / "doc.txt"
    data.write_text(TEXT)
    res = CliRunner().invoke(app, ["eval", "ppl", "--endpoint", server.url, "--model", NAME,
                                   "--api-key", "wrong", "--data", str(data), "-o", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "HTTP 401" in res.output


def test_endpoint_humaneval_matches_in_process(server, ckpt, tmp_path):
    problems = H.load_problems()
    tasks = sorted(problems, key=lambda t: len(problems[t]["prompt"]))[:3]
    common = [x for t in tasks for x in ("--task", t)] + ["--max-tokens", "24", "--workers", "2"]
    run("humaneval", *endpoint_args(server), *common, "-o", tmp_path / "ep.json")
    run("humaneval", "--model", ckpt, *LOCAL, *common, "-o", tmp_path / "local.json")
    ep = H.read_completions(tmp_path / "ep-completions.jsonl")
    local = H.read_completions(tmp_path / "local-completions.jsonl")
    assert set(ep) == set(tasks) and ep == local
    assert any(c[0].strip() for c in ep.values())         # real text came back, not only errors
    rep = json.loads((tmp_path / "ep.json").read_text())
    assert [r["id"] for r in rep["rows"]] == tasks and "pass@1" in rep["summary"]


def test_endpoint_svg_and_needle(server, tmp_path):
    run("svg", *endpoint_args(server), "--limit", "2", "--max-tokens", "24", "-o", tmp_path / "svg.json")
    rep = json.loads((tmp_path / "svg.json").read_text())
    assert len(rep["rows"]) == 2 and "valid_rate" in rep["summary"]
    assert (tmp_path / "svg-contact.png").is_file()
    run("needle", *endpoint_args(server), "--max-model-len", "256", "--contexts", "200,240", "--depths", "0,1",
        "--trials", "1", "--max-tokens", "4", "-o", tmp_path / "needle.json")
    rep = json.loads((tmp_path / "needle.json").read_text())
    assert len(rep["rows"]) == 4 and rep["summary"]["lengths"] == "estimated (4 chars/token)"
