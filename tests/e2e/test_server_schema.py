"""Property-based API test: schemathesis generates requests (valid and invalid) from the server's own
OpenAPI schema; no response may be a 5xx, and the server must stay healthy with no pages held."""
import httpx
import pytest
from hypothesis import HealthCheck, settings

from tests.helpers.tiny_models import make_checkpoint
from tierserve.server.testing import ServerProcess

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

# Small max_model_len keeps every generated request short (max_tokens beyond it is a 400).
ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "16"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("srv") / "llama", "llama")
    with ServerProcess(ckpt, *ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error], timeout=60)


def test_still_healthy_after_fuzzing(server):
    assert httpx.get(server.url + "/health").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    assert "tierserve:kv_blocks_used{" in text and "} 0.0" in text.split("tierserve:kv_blocks_used{")[1][:200]
