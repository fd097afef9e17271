"""Tokenizer loaded from a Hugging Face model directory (tokenizer.json + configs), without transformers.

Behaviour follows ``transformers.PreTrainedTokenizerFast`` (v5 ``TokenizersBackend``) for a directory whose
tokenizer.json is used as-is: named special tokens and ``added_tokens_decoder`` entries from
tokenizer_config.json are registered with the backend the same way, so ``encode``/``decode`` give the same ids
and text. Model-specific transformers classes that rebuild the pipeline from vocab/merges are not emulated:
tokenizer.json is the authority here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from tierserve.loader.chat_template import render_chat_template, select_template

# Named special-token attributes, in transformers' order.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    """A special token given as a string or as a serialised AddedToken dict ({"content": ...})."""
    if value is None:
        return None
    if isinstance(value, dict):
        content = value.get("content")
        return str(content) if content is not None else None
    return str(value)


def _added_token(value: Any, special: bool | None = None) -> AddedToken:
    if isinstance(value, dict):
        fields = {k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value}
        if special is not None and not fields.get("special", False):
            fields["special"] = special
        return AddedToken(**fields)
    return AddedToken(str(value), special=True if special is None else special)


class Tokenizer:
    """Byte/BPE/Unigram tokenizer from ``tokenizer.json`` with special tokens and a chat template."""

    def __init__(self, backend: _Backend, config: dict | None = None, chat_templates: dict[str, str] | None = None,
                 generation_config: dict | None = None):
        config = dict(config or {})
        self._backend = backend
        backend.no_truncation()
        backend.no_padding()
        self._register_special_tokens(config)
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        )
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.chat_template: str | None = self.chat_templates.get("default")
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.pad_token: str | None = self.special_tokens.get("pad_token")
        self.unk_token: str | None = self.special_tokens.get("unk_token")
        self.bos_token_id: int | None = self.token_to_id(self.bos_token)
        self.pad_token_id: int | None = self.token_to_id(self.pad_token)
        eos: list[int] = []
        gen_eos = (generation_config or {}).get("eos_token_id")
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        for tid in [self.token_to_id(self.eos_token), *gen_eos]:
            if tid is not None and int(tid) not in eos:
                eos.append(int(tid))
        self.eos_token_ids: list[int] = eos

    def _register_special_tokens(self, config: dict) -> None:
        """Mirror transformers: config ``added_tokens_decoder`` entries, named special tokens (including
        model-specific ``*_token`` keys) and extra special tokens that the backend does not already hold as
        added tokens are added as (special) added tokens."""
        named: dict[str, Any] = {k: config[k] for k in SPECIAL_TOKEN_KEYS if _token_str(config.get(k)) is not None}
        for key, value in config.items():  # model-specific named tokens, e.g. "image_token"
            if key.endswith("_token") and key not in named and isinstance(value, (str, dict)) and _token_str(value):
                named[key] = value
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            named.update({k: v for k, v in extra.items() if _token_str(v) is not None})
            extra = []
        self.special_tokens: dict[str, str] = {k: _token_str(v) for k, v in named.items()}
        self.extra_special_tokens: list[str] = [s for s in map(_token_str, extra) if s is not None]

        have = {tok.content for tok in self._backend.get_added_tokens_decoder().values()}
        to_add: list[AddedToken] = []
        decoder = config.get("added_tokens_decoder") or {}
        for _, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            if isinstance(value, dict) and value.get("content") is not None and value["content"] not in have:
                to_add.append(_added_token(value))
                have.add(value["content"])
        for value, named_token in [*((v, True) for v in named.values()), *((v, False) for v in extra)]:
            content = _token_str(value)
            if content is not None and content not in have:
                to_add.append(_added_token(value, special=True if named_token else None))
                have.add(content)
        if to_add:
            self._backend.add_tokens(to_add)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_file}")
        backend = _Backend.from_file(str(tok_file))
        config = _read_json(root / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # transformers only consults the legacy special_tokens_map.json in this case, and lets it win.
            for key, value in _read_json(root / "special_tokens_map.json").items():
                if key == "extra_special_tokens" and isinstance(value, list):
                    old = list(config.get("extra_special_tokens") or [])
                    value = old + [t for t in value if t not in old]
                config[key] = value
        return cls(backend, config, _load_chat_templates(root, config), _read_json(root / "generation_config.json"))

    @classmethod
    def synthetic(cls, vocab_size: int) -> "Tokenizer":
        """A stand-in for checkpoints without tokenizer.json (random-weight benchmarks): token i is the
        word ``t<i>``; other words encode to the unknown token t0. Text in and out keeps working, the text
        means nothing. No EOS token, no chat template."""
        from tokenizers import decoders, models, pre_tokenizers

        backend = _Backend(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)    # joins words with spaces
        return cls(backend, {})

    # ---- encoding / decoding -------------------------------------------------------------------------------
    @property
    def backend(self) -> _Backend:
        return self._backend

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._cleanup else text

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> list[str]:
        """Token strings for ``ids`` (a single id also gives a one-element list)."""
        return [self._backend.id_to_token(i) for i in _id_list(ids)]

    @property
    def all_special_ids(self) -> list[int]:
        toks = [*self.special_tokens.values(), *self.extra_special_tokens]
        ids = (self.token_to_id(t) for t in dict.fromkeys(toks))
        return [i for i in ids if i is not None]

    # ---- chat ----------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            tools: list | None = None, **kwargs: Any) -> str | list[int]:
        source = select_template(self.chat_templates, kwargs.pop("chat_template", None), tools)
        text = render_chat_template(source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    special_tokens=self.special_tokens, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _load_chat_templates(root: Path, config: dict) -> dict[str, str]:
    """chat_template.jinja and additional_chat_templates/*.jinja win over tokenizer_config's chat_template."""
    files: dict[str, str] = {}
    if (root / "chat_template.jinja").is_file():
        files["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files
    tmpl = config.get("chat_template")
    if isinstance(tmpl, str):
        return {"default": tmpl}
    if isinstance(tmpl, (list, tuple)):
        return {t["name"]: t["template"] for t in tmpl}
    if isinstance(tmpl, dict):
        return dict(tmpl)
    return {}


def _id_list(ids: Any) -> list[int]:
    """Accept an int, a sequence of ints, or an array/tensor (anything with ``tolist``)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _clean_up(text: str) -> str:
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas.

    Keeps a small window of ids (``prefix_offset:read_offset`` already emitted, ``read_offset:`` pending) and
    emits ``decode(window + pending) - decode(window)`` once it no longer ends in U+FFFD, so a multi-byte
    character split over several tokens is emitted whole. ``prompt_ids`` (optional) give the window its initial
    context. Text still held back at the end of the stream is returned by :meth:`flush`.
    """

    _CONTEXT = 5  # prompt tokens of context for the first window

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in (prompt_ids or [])]
        self._read = len(self._ids)
        self._prefix = max(self._read - self._CONTEXT, 0)
        self._num_prompt = self._read
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        """The generated ids fed so far (the prompt excluded)."""
        return self._ids[self._num_prompt:]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix, self._read) if self._read > self._prefix else ""
        new_text = self._decode(self._prefix)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Feed one token id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """End of stream: return any text still held back (e.g. a trailing incomplete byte sequence as U+FFFD)."""
        return self._step(final=True) if self._read < len(self._ids) else ""
