"""The endpoint generator against a fake OpenAI-compatible server (httpx.MockTransport) backed by our engine:
request shapes (echo/logprobs/max_tokens, stop, auth), retries, errors, and endpoint ppl == in-process ppl."""
import json
import threading

import httpx
import pytest

from tests.helpers.tiny_models import make_checkpoint
from tierserve import SamplingParams
from tierserve.eval import ppl as P
from tierserve.eval.client import EndpointError, EndpointGenerator, GenParams, LocalGenerator, make_generator


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="module")
def local(ckpt):
    return LocalGenerator(str(ckpt), dtype="float32", device="cpu", max_model_len=256)


def fake_server(local, log):
    """vLLM semantics: echo=True + logprobs=0 returns the prompt tokens' logprobs (first null) then the output's."""
    lock = threading.Lock()        # the client sends requests from several threads; LLM is not thread-safe

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            return answer(request)

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        log.append((request.url.path, body, request.headers.get("authorization")))
        if body.get("model") == "flaky" and len(log) < 3:
            return httpx.Response(503, text="busy")
        if body.get("model") == "missing":
            return httpx.Response(404, json={"error": "model not found"})
        llm, tok = local.llm, local.tokenizer
        prompt = body.get("prompt")
        if request.url.path.endswith("/chat/completions"):
            prompt = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        ids = prompt if isinstance(prompt, list) else tok.encode(prompt)
        sp = SamplingParams(n=body.get("n", 1), max_tokens=max(1, body.get("max_tokens", 16)),
                            temperature=body.get("temperature", 1.0), stop=body.get("stop"),
                            prompt_logprobs=0 if body.get("echo") else None, ignore_eos=True)
        out = llm.generate([ids], sp)[0]
        choices = []
        for o in out.outputs:
            c = {"index": o.index, "finish_reason": o.finish_reason}
            if body.get("echo"):
                plp = [None] + [out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))]
                c["text"] = (prompt if isinstance(prompt, str) else tok.decode(ids)) + o.text
                c["logprobs"] = {"token_logprobs": plp + [0.0] * len(o.token_ids)}
            elif "messages" in body:
                c["message"] = {"role": "assistant", "content": o.text}
            else:
                c["text"] = o.text
            choices.append(c)
        return httpx.Response(200, json={"choices": choices, "usage": {"prompt_tokens": len(ids)}})
    return httpx.MockTransport(handler)


def endpoint(local, ckpt, log, model="tiny", tokenizer=True, **kw):
    return EndpointGenerator("http://fake:8000", model, api_key="sk-test", tokenizer=str(ckpt) if tokenizer else None,
                             transport=fake_server(local, log), max_model_len=256, **kw)


def test_endpoint_ppl_equals_in_process(local, ckpt):
    log = []
    ep = endpoint(local, ckpt, log)
    docs = [("d", "import os\n\ndef main(argv):\n    return len(argv) + 1\n" * 6)]
    want = P.evaluate(local, docs, context=48, stride=16)
    got = P.evaluate(ep, docs, context=48, stride=16)
    assert got.tokens == want.tokens and got.windows == want.windows
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6) and not got.approximate
    path, body, auth = log[0]
    assert path == "/v1/completions" and auth == "Bearer sk-test"
    assert body["echo"] is True and body["logprobs"] == 0 and body["max_tokens"] == 1
    assert isinstance(body["prompt"], list)         # token ids: windows are token-exact


def test_endpoint_ppl_without_tokenizer_is_approximate(local, ckpt):
    ep = endpoint(local, ckpt, [], tokenizer=False)
    assert ep.tokenizer is None
    got = P.evaluate(ep, [("d", "x = 1\ny = 2\n" * 20)], context=64, stride=16)
    assert got.approximate and got.tokens > 0 and got.ppl > 1


def test_endpoint_complete_matches_in_process(local, ckpt):
    log = []
    ep = endpoint(local, ckpt, log)
    params = GenParams(max_tokens=12, temperature=0.0, stop=["\n\n"])
    prompts = ["def add(a, b):", "class Foo:"]
    got = ep.complete(prompts, params)
    want = local.complete(prompts, params)
    assert [[c.text for c in cs] for cs in got] == [[c.text for c in cs] for cs in want]
    assert log[0][1]["stop"] == ["\n\n"] and log[0][1]["temperature"] == 0.0
    chat = ep.complete(["hello"], GenParams(max_tokens=4, temperature=0.0), chat=True)
    assert log[-1][0] == "/v1/chat/completions" and isinstance(chat[0][0].text, str)


def test_retries_then_succeeds_and_errors_are_clear(local, ckpt, monkeypatch):
    import tierserve.eval.client as C

    monkeypatch.setattr(C.time, "sleep", lambda s: None)
    log = []
    out = endpoint(local, ckpt, log, model="flaky", retries=3).complete(["x = "], GenParams(max_tokens=2))
    assert len(out) == 1 and len(log) == 3            # two 503s, then the answer
    with pytest.raises(EndpointError, match="HTTP 404"):
        endpoint(local, ckpt, [], model="missing").complete(["x"], GenParams(max_tokens=2))


def test_stop_strings_are_applied_client_side():
    from tierserve.eval.client import truncate_at_stop
    assert truncate_at_stop("a\nb\ndef c", ["\ndef", "\nclass"]) == "a\nb"
    assert truncate_at_stop("abc", []) == "abc"


def test_make_generator_rejects_engine_settings_with_endpoint():
    with pytest.raises(ValueError, match="--model NAME is required"):
        make_generator(endpoint="http://x")
    with pytest.raises(ValueError, match="--page-size"):
        make_generator(model="m", endpoint="http://x", page_size=8)
    g = make_generator(model="m", endpoint="http://x/v1/", max_model_len=4096)
    assert g.base == "http://x/v1" and g.max_model_len == 4096
