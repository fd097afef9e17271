"""Bad input gets 400 naming the field, unknown model 404, missing/wrong key 401 (health open); SIGTERM
lets in-flight work finish and exits 0."""
import time

import httpx
import openai
import pytest

from tierserve.server.testing import ServerProcess

ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "128"]
KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(ckpt):
    with ServerProcess(ckpt, *ARGS, "--served-model-name", "tiny", api_key=KEY) as s:
        yield s


def post(server, path, body=None, content=None, headers=AUTH):
    if content is not None:
        return httpx.post(server.url + path, content=content,
                          headers={**headers, "Content-Type": "application/json"})
    return httpx.post(server.url + path, json=body, headers=headers)


CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
BAD = [  # path, body, param, words in the message
    (CMPL, {"prompt": "hi", "temperature": "hot"}, "temperature", "number"),
    (CMPL, {"prompt": "hi", "temperature": 5}, "temperature", "2"),
    (CMPL, {"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    (CMPL, {"prompt": "hi", "top_k": -5}, "top_k", ""),
    (CMPL, {"prompt": "hi", "n": 0}, "n", ""),
    (CMPL, {"prompt": "hi", "n": 1000}, "n", "64"),
    (CMPL, {"prompt": "hi", "max_tokens": -1}, "max_tokens", ""),
    (CMPL, {"prompt": "hi", "max_tokens": "10"}, "max_tokens", "integer"),
    (CMPL, {"prompt": "hi", "max_tokens": 500}, "max_tokens", "max_model_len"),
    (CMPL, {"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, "min_tokens", "max_tokens"),
    (CMPL, {"prompt": "hi", "presence_penalty": 3}, "presence_penalty", ""),
    (CMPL, {"prompt": "hi", "logprobs": 50}, "logprobs", "20"),
    (CMPL, {"prompt": "hi", "seed": -1}, "seed", ""),
    (CMPL, {"prompt": "hi", "stop": [""]}, "stop", "empty"),
    (CMPL, {"prompt": "hi", "stop": 5}, "stop", "string"),
    (CMPL, {"prompt": "hi", "stream": "yes"}, "stream", "bool"),
    (CMPL, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    (CMPL, {"prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    (CMPL, {"max_tokens": 3}, "prompt", "required"),
    (CMPL, {"prompt": ""}, "prompt", "empty"),
    (CMPL, {"prompt": []}, "prompt", "empty"),
    (CMPL, {"prompt": 123}, "prompt", "string"),
    (CMPL, {"prompt": [100000]}, "prompt", "vocabulary"),
    (CMPL, {"prompt": "hello " * 200}, "prompt", "max_model_len"),
    (CHAT, {"messages": []}, "messages", "at least 1"),
    (CHAT, {}, "messages", "required"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", ""),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content", ""),
    (CHAT, {"messages": "hi"}, "messages", "list"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    (CHAT, {"messages": MSG, "n": 65}, "n", ""),
    (CHAT, {"messages": [{"role": "user", "content": "hello " * 200}]}, "messages", "max_model_len"),
    ("/detokenize", {"tokens": [-1]}, "tokens", "vocabulary"),
    ("/tokenize", {}, "prompt", "exactly one"),
]


@pytest.mark.parametrize("path,body,param,words", BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(server, path, body, param, words):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert param.split(".")[0] in err["message"] and words in err["message"], err


@pytest.mark.parametrize("content", ['{"prompt": "hi", ', "not json", "[1, 2]", "null", ""])
def test_malformed_body_is_400(server, content):
    r = post(server, CMPL, content=content)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_openai_client_sees_400(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", temperature=9)
    assert "temperature" in str(e.value)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_unknown_model_and_route_404(server):
    for path, body in [(CMPL, {"model": "gpt-9", "prompt": "hi"}), (CHAT, {"model": "gpt-9", "messages": MSG})]:
        r = post(server, path, body)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert "gpt-9" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing", headers=AUTH).status_code == 404
    assert httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"


def test_api_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert post(server, CMPL, {"prompt": "hi"}, headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_engine_survives_bad_input(server):
    """After all of the above, the server still answers and holds no pages."""
    r = post(server, CMPL, {"prompt": "still alive", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert 'tierserve:kv_blocks_used{model_name="tiny"} 0.0' in httpx.get(server.url + "/metrics").text


def test_sigterm_finishes_in_flight_then_exits_0(ckpt):
    srv = ServerProcess(ckpt, *ARGS)
    try:
        body = {"prompt": "hello", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", srv.url + CMPL, json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln)
            assert first.startswith("data: {")
            srv.proc.send_signal(15)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        assert '"completion_tokens":100' in rest[-2]            # finished, not cut off
        assert srv.proc.wait(30) == 0, srv.output()
        time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health")
    finally:
        srv.stop()
