import pytest

from tierserve.sampling import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert p.n == 1 and p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.seed is None
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy


BAD = [
    ("n", 0), ("n", -1), ("n", 1.0), ("n", True), ("n", "2"),
    ("temperature", -0.1), ("temperature", "hot"), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", None), ("temperature", True),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", "1"),
    ("top_k", -2), ("top_k", 2.5), ("top_k", False),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", [0.1]),
    ("seed", 1.5), ("seed", "42"), ("seed", True),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 1.5), ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 0.5),
    ("stop", ""), ("stop", ["a", ""]), ("stop", [1]), ("stop", 5),
    ("stop_token_ids", [1, -1]), ("stop_token_ids", ["a"]), ("stop_token_ids", 3), ("stop_token_ids", [True]),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0), ("logprobs", True),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", "3"),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", "x"),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", None),
    ("frequency_penalty", 3), ("frequency_penalty", -2.5), ("frequency_penalty", "0"),
    ("skip_special_tokens", 0), ("include_stop_str_in_output", "no"),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_values_name_the_field(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


def test_messages_state_the_range():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 20\]"):
        SamplingParams(logprobs=50)


def test_normalisation():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(1, 2), temperature=1, top_p=1)
    assert p.top_k == 0 and p.stop == ["###"] and p.stop_token_ids == [1, 2]
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_accepted_edges():
    SamplingParams(temperature=0, top_p=1e-9, min_p=1.0, logprobs=0, prompt_logprobs=20, seed=-5,
                   presence_penalty=-2, frequency_penalty=2, repetition_penalty=1e-3, top_k=1, max_tokens=1)


def test_greedy_and_clone():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy
    p = SamplingParams(stop=["x"], stop_token_ids=[3], seed=7)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(4)
    assert p.stop == ["x"] and p.stop_token_ids == [3]
