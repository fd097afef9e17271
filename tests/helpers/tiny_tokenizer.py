"""Build a tiny byte-level BPE tokenizer directory for tests (nothing downloaded).

``make_tokenizer_dir(path)`` trains a ``tokenizers`` BPE on a few KB of local text (a stdlib source file plus a
fixed multilingual snippet) and writes ``tokenizer.json`` and ``tokenizer_config.json`` the way a Hugging Face
checkpoint has them, loadable by both ``tierserve.loader.tokenizer.Tokenizer`` and transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# Special tokens get ids 0.. in this order.
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END, START_HEADER, END_HEADER, EOT]

DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

EXTRA_TEXT = (
    "Hello, world! The quick brown fox jumps over the lazy dog. 0123456789\n"
    "Grüße aus München – naïve café, déjà vu. Ελληνικά. Русский текст. 日本語のテキスト。中文文本。\n"
    "Emoji: 😀 🚀 👍🏽 🇩🇪 ❤️ — “quotes” and ‘apostrophes’ … ✓\n"
)


def training_text(max_chars: int = 8000) -> str:
    """A few KB of local text: the start of a stdlib source file plus a fixed multilingual snippet."""
    with open(textwrap.__file__, encoding="utf-8") as f:
        source = f.read(max_chars)
    return source + "\n" + EXTRA_TEXT * 3


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE (at most ``vocab_size`` tokens incl. specials) with a bos-prepending post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = training_text()
    lines = [text[i:i + 1000] for i in range(0, len(text), 1000)]
    tok.train_from_iterator(lines, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


def make_tokenizer_dir(path: str | os.PathLike, vocab_size: int = 512, chat_template: str | None = DEFAULT_CHATML,
                       **config_overrides) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``path`` (created if needed) and return it.

    ``chat_template=None`` leaves the template out; ``config_overrides`` are merged into tokenizer_config.json.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(config_overrides)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return out
