"""Shared fixtures of the end-to-end tests."""
import pytest

from tests.helpers.tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Llama checkpoint with a tokenizer (one per test module; servers only read it)."""
    return make_checkpoint(tmp_path_factory.mktemp("srv") / "llama", "llama")


@pytest.fixture(scope="module")
def server(request, ckpt):
    """A real `tierserve serve` process started with the test module's ``ARGS``."""
    from tierserve.server.testing import ServerProcess

    with ServerProcess(ckpt, *request.module.ARGS) as s:
        yield s
