"""The CLI: --version, info on shipped configs, generate with the embedded model, clear errors."""
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tierserve import __version__
from tierserve.cli import app

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


@pytest.mark.parametrize("name, expect", [("llama-3.1-8b", "8,030.26 M"), ("qwen3-8b", "Qwen3ForCausalLM"),
                                          ("deepseek-v4-flash", "MODEL1"), (None, "LlamaForCausalLM")])
def test_info(name, expect):
    r = runner.invoke(app, ["info"] + (["--model", name] if name else []))
    assert r.exit_code == 0, r.output
    assert expect in r.output


def test_info_bad_model():
    r = runner.invoke(app, ["info", "--model", "/no/such/dir"])
    assert r.exit_code == 2 and "no such directory" in r.output


def test_generate_default_model_streams_text():
    # a real process, as a user runs it
    res = subprocess.run([sys.executable, "-m", "tierserve.cli", "generate", "def fibonacci(n):",
                          "--max-tokens", "12", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def fibonacci(n):") and len(res.stdout) > len("def fibonacci(n):") + 5


def test_generate_rejects_bad_settings():
    r = runner.invoke(app, ["generate", "x", "--temperature", "-1"])
    assert r.exit_code == 2 and "temperature" in r.output
    r = runner.invoke(app, ["generate", "x", "--page-size", "3"])
    assert r.exit_code == 2 and "page_size" in r.output
