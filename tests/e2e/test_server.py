"""The real `tierserve serve` process on loopback, driven with the official openai client and httpx:
completions and chat (stream and not), usage, greedy equality with LLM.generate, logprobs, echo, n,
stop strings, tokenize/detokenize, metrics names."""
import json

import httpx
import openai
import pytest

from tierserve import LLM, SamplingParams

ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256"]
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=256)


def greedy(max_tokens=20, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def test_health_version_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json()["version"]
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert httpx.get(server.url + "/v1/models/nope").status_code == 404


def test_completion_matches_llm_generate(server, client, llm):
    ref = llm.generate([PROMPT], greedy(20))[0]
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=20, temperature=0)
    assert r.choices[0].text == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    tok = llm.get_tokenizer()
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # token-id prompts give the same result
    r2 = client.completions.create(model=server.model, prompt=tok.encode(PROMPT), max_tokens=20, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_completion_stream(server, client):
    full = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_matches_llm_chat(server, client, llm):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ref = llm.chat(msgs, greedy(16))[0]
    r = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    ids = llm.get_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    # stream: role first, the same content, usage last
    chunks = list(client.chat.completions.create(model=server.model, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_raw_sse_framing(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] is not None
    for _ in range(5):      # a request may finish before its stream is read: the output must still arrive
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "max_tokens": 1}) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"]


def test_completion_logprobs_and_echo(server, client, llm):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                  echo=True, extra_body={"ignore_eos": True})
    c = r.choices[0]
    n_prompt = r.usage.prompt_tokens
    lp = c.logprobs
    assert c.text.startswith(PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == sorted(lp.text_offset)
    for t, v, top in zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:]):
        assert 3 <= len(top) <= 4 and top[t] == pytest.approx(v)
        assert v == pytest.approx(max(top.values()))                 # greedy picks the top token
    ref = llm.generate([PROMPT], greedy(5, logprobs=3, ignore_eos=True))[0].outputs[0]
    want = [d[t] for d, t in zip(ref.logprobs, ref.token_ids)]
    assert lp.token_logprobs[n_prompt:] == pytest.approx(want, abs=1e-4)
    # stream with logprobs: one entry per generated token
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0,
                                            logprobs=1, stream=True, extra_body={"ignore_eos": True}))
    toks = [t for ch in chunks for t in (ch.choices[0].logprobs.tokens if ch.choices[0].logprobs else [])]
    assert len(toks) == 5


def test_chat_logprobs(server, client):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e in content:
        assert len(e.top_logprobs) == 2
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)


def test_n_batch_and_seed(server, client):
    kw = dict(model=server.model, max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=PROMPT, n=3, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert client.completions.create(prompt=PROMPT, n=3, **kw).choices[0].text == r.choices[0].text
    r = client.completions.create(prompt=["a b c", "d e f g"], n=2, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 32
    chunks = list(client.completions.create(prompt=["a b c", "d e f g"], n=2, stream=True, **kw))
    done = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert done == {0, 1, 2, 3}
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "x"}], n=2, **kw)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_stop_string_stream_equals_nonstream(server, client):
    base = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[8:11]
    assert stop and base.find(stop) >= 0
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert r.choices[0].text == base[:base.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == r.choices[0].text


def test_tokenize_detokenize(server, llm):
    tok = llm.get_tokenizer()
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == tok.encode(PROMPT) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    d = httpx.post(server.url + "/detokenize", json={"tokens": tok.encode(PROMPT, add_special_tokens=False)})
    assert d.json()["prompt"] == PROMPT
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert r["tokens"] == tok.apply_chat_template(msgs, tokenize=True)


def test_metrics_names(server, client):
    client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_blocks_used",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 'request_success_total{finished_reason="length"', "prefix_cache_queries_total",
                 'prefix_cache_hits_total{model_name="%s",tier="gpu"}' % server.model, "num_preemptions_total"]:
        assert "tierserve:" + name in text, name


def test_lm_eval_style_loglikelihood(server, llm):
    """What `lm_eval --model local-completions` sends for loglikelihood: token-id prompts in a batch,
    echo + logprobs=1 + max_tokens=1; it reads token_logprobs / top_logprobs of the prompt tokens."""
    tok = llm.get_tokenizer()
    prompts = [tok.encode("the quick brown fox jumps"), tok.encode("over the lazy dog")]
    r = httpx.post(server.url + "/v1/completions", json={"model": server.model, "prompt": prompts,
                   "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}).json()
    refs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    for choice, ids, ref in zip(sorted(r["choices"], key=lambda c: c["index"]), prompts, refs):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1
        want = [d[t] for d, t in zip(ref.prompt_logprobs[1:], ids[1:])]
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
        for v, top in zip(lp["token_logprobs"][1:-1], lp["top_logprobs"][1:-1]):
            assert v <= max(top.values()) + 1e-6
    info = httpx.get(server.url + "/tokenizer_info").json()      # lm_eval's remote tokenizer probe
    assert info["eos_token"] == tok.eos_token and info["chat_template"]
    r = httpx.post(server.url + "/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("test", add_special_tokens=False)
