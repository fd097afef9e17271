"""Tokenizer, chat templates and incremental detokenization, checked against transformers on a tiny BPE."""

import json

import pytest

from tests.helpers.tiny_tokenizer import EOT, IM_END, SPECIAL_TOKENS, make_tokenizer_dir
from tierserve.loader.chat_template import ChatTemplateError, compile_template
from tierserve.loader.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "def f(x):\n    return x * 2  # comment\n",
    "Grüße aus München – naïve café 日本語 中文 Ελληνικά",
    "Emoji 😀🚀 👍🏽 🇩🇪 ❤️ family 👨‍👩‍👧 end",
    "special tokens inline <|eos|> and <|im_start|>user<|im_end|>",
    "rare: \u0000 \u200b \U0001F9EC 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|start_header_id|>system<|end_header_id|>\\n\\nYou are helpful.<|eot_id|>' }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Plain (non-dash) blocks on their own lines: output depends on trim_blocks / lstrip_blocks.
TOOLS_TEMPLATE = """{% if tools %}
<tools>
    {% for tool in tools %}
{{ tool | tojson(indent=2, sort_keys=True) }}
    {% endfor %}
</tools>
{% endif %}
{% for message in messages %}
    {% if message.role == 'assistant' and message.tool_calls is defined %}
<|im_start|>assistant {{ message.tool_calls | tojson }}<|im_end|>
    {% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}
{{ {'k': 'ü<&>', 'a': [1, 2]} | tojson(separators=(',', ':')) }} {{ eos_token }}|{{ pad_token }}|{{ flavour | default('none') }}
"""

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city — “quoted” <html> & ünïcode",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What's 2+2? 🤔  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Thanks — danke schön!"},
]


def load_hf(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pair(tok_dir):
    return Tokenizer.from_dir(tok_dir), load_hf(tok_dir)


def test_special_tokens_and_sizes(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf) <= 512
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert ours.bos_token_id == hf.bos_token_id == 0
    assert ours.eos_token_ids == [hf.eos_token_id]
    assert ours.chat_template == hf.chat_template


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_decode_match_transformers(pair, add_special):
    ours, hf = pair
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.encode("x")[0] == ours.bos_token_id


def test_pretrained_tokenizer_fast_from_file(tok_dir):
    ours = Tokenizer.from_dir(tok_dir)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == hf.decode(hf.encode(text))


def chat_both(ours, hf, messages, **kw):
    kw.setdefault("add_generation_prompt", True)  # our default; transformers' default is False
    a = ours.apply_chat_template(messages, tokenize=False, **kw)
    b = hf.apply_chat_template(messages, tokenize=False, **kw)
    assert a == b
    return a


def test_chatml_template(pair):
    ours, hf = pair
    for gen in (True, False):
        text = chat_both(ours, hf, MESSAGES, add_generation_prompt=gen)
        assert text.endswith("<|im_start|>assistant\n") == gen
    ids = ours.apply_chat_template(MESSAGES, tokenize=True)
    assert ids == hf.encode(ours.apply_chat_template(MESSAGES), add_special_tokens=False)
    assert ids[0] == ours.encode("<|im_start|>", add_special_tokens=False)[0]  # no bos added when tokenizing
    text = chat_both(ours, hf, MESSAGES[:3], add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\n4")


def test_llama3_template(tmp_path):
    d = make_tokenizer_dir(tmp_path, chat_template=LLAMA3_TEMPLATE)
    ours, hf = Tokenizer.from_dir(d), load_hf(d)
    text = chat_both(ours, hf, MESSAGES[1:], add_generation_prompt=True)
    assert text.startswith("<|bos|><|start_header_id|>system")  # bos_token + loop.first branch
    assert "What's 2+2? 🤔<|eot_id|>" in text  # | trim
    chat_both(ours, hf, MESSAGES, add_generation_prompt=False)
    with pytest.raises(ValueError, match="Unknown role: robot") as exc:
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])
    assert isinstance(exc.value, ChatTemplateError)


def test_tools_template_tojson(tmp_path):
    d = make_tokenizer_dir(tmp_path, chat_template=TOOLS_TEMPLATE)
    ours, hf = Tokenizer.from_dir(d), load_hf(d)
    msgs = MESSAGES + [{"role": "assistant", "content": None,
                        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}}]}]
    text = chat_both(ours, hf, msgs, tools=TOOLS, add_generation_prompt=True, flavour="spicy")
    assert "“quoted” <html> & ünïcode" in text and '"city": {\n' in text  # ensure_ascii=False, indent, no escaping
    assert '{"k":"ü<&>","a":[1,2]}' in text and "|spicy" in text
    assert "\n    " not in text.split("</tools>")[1]  # lstrip_blocks removed the block indentation
    chat_both(ours, hf, MESSAGES, add_generation_prompt=False)  # tools=None branch
    chat_both(ours, hf, MESSAGES, eos_token="<override>")  # kwargs override special tokens


def test_strftime_now(tmp_path):
    d = make_tokenizer_dir(tmp_path, chat_template="{{ strftime_now('%Y') }}|{{ messages[0].content }}")
    text = Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}])
    year, rest = text.split("|")
    assert year.isdigit() and len(year) == 4 and rest == "hi"


def test_chat_template_jinja_precedence(tmp_path):
    d = make_tokenizer_dir(tmp_path, chat_template="FROM CONFIG")
    (d / "chat_template.jinja").write_text("FROM FILE {{ messages | length }}", encoding="utf-8")
    ours, hf = Tokenizer.from_dir(d), load_hf(d)
    assert ours.chat_template == hf.chat_template == "FROM FILE {{ messages | length }}"
    assert chat_both(ours, hf, MESSAGES) == "FROM FILE 4"


def test_template_compiled_once():
    assert compile_template("{{ 1 }}") is compile_template("{{ 1 }}")


def test_eos_union_and_dict_tokens(tmp_path):
    eot = {"__type": "AddedToken", "content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}
    d = make_tokenizer_dir(tmp_path, eos_token=eot, bos_token={"content": "<|bos|>"}, pad_token="<|newpad|>")
    (d / "tokenizer_config.json").write_text(
        json.dumps({**json.loads((d / "tokenizer_config.json").read_text()), "bos_token": "<|bos|>"}))
    im_end = SPECIAL_TOKENS.index(IM_END)
    eot_id = SPECIAL_TOKENS.index(EOT)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, im_end, eot_id, 1]}))
    ours, hf = Tokenizer.from_dir(d), load_hf(d)
    assert ours.eos_token == EOT and ours.eos_token_ids == [eot_id, 1, im_end]
    assert ours.eos_token_ids[0] == hf.eos_token_id
    # A pad token missing from the vocab is added, as transformers does.
    assert ours.vocab_size == len(hf) and ours.pad_token_id == hf.pad_token_id == len(hf) - 1
    text = "a <|newpad|> b"
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)

    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.from_dir(d).eos_token_ids == [eot_id, 1]


def test_dict_bos_token_and_special_tokens_map(tmp_path):
    d = make_tokenizer_dir(tmp_path, bos_token={"__type": "AddedToken", "content": "<|bos|>", "special": True})
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["added_tokens_decoder"], cfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": IM_END, "special": True}}))
    ours, hf = Tokenizer.from_dir(d), load_hf(d)
    assert ours.bos_token == hf.bos_token == "<|bos|>" and ours.bos_token_id == 0
    assert ours.eos_token == hf.eos_token == IM_END
    assert ours.eos_token_ids == [hf.eos_token_id]


def check_stream(tok, ids, prompt_ids=None, skip=True):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)
    return deltas


def test_incremental_detokenizer(pair):
    ours, _ = pair
    text = "Héllo 😀🚀 wörld 👨‍👩‍👧 日本語 ok 👍🏽!"
    ids = ours.encode(text, add_special_tokens=False)
    # The test is only meaningful if some character is split over several tokens.
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    deltas = check_stream(ours, ids)
    assert "".join(deltas) == text
    check_stream(ours, ids, prompt_ids=ours.encode("Prompt: 日本"))
    with_specials = ours.encode("a😀<|eos|>b", add_special_tokens=True) + [1]
    check_stream(ours, with_specials, skip=True)
    check_stream(ours, with_specials, skip=False)


def test_incremental_detokenizer_flush_incomplete(pair):
    ours, _ = pair
    ids = ours.encode("x😀", add_special_tokens=False)[:-1]  # ends mid-character
    detok = IncrementalDetokenizer(ours)
    streamed = "".join(detok.add(i) for i in ids)
    assert streamed == "x"
    assert streamed + detok.flush() == ours.decode(ids)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template(tmp_path):
    ours = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, chat_template=None))
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("messages, field", [
    ("hello", "list"),
    ([], "at least one"),
    (["hello"], r"messages\[0\]"),
    ([{"content": "hi"}], "'role'"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\].*'content'"),
])
def test_bad_messages(pair, messages, field):
    with pytest.raises(ValueError, match=field):
        pair[0].apply_chat_template(messages)


def test_template_syntax_error(tmp_path):
    ours = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, chat_template="{% for m in messages %}"))
    with pytest.raises(ValueError, match="syntax error"):
        ours.apply_chat_template(MESSAGES)


def test_synthetic_tokenizer_round_trip():
    """Random-weight checkpoints without tokenizer.json get a stand-in: token i <-> word t<i>."""
    from tierserve.loader.tokenizer import Tokenizer
    tok = Tokenizer.synthetic(300)
    assert tok.encode("t5 t7  t299") == [5, 7, 299]
    assert tok.encode("hello") == [0]                       # unknown words -> t0
    assert tok.decode([45, 136]) == "t45 t136"
    assert tok.eos_token_ids == [] and tok.chat_template is None
