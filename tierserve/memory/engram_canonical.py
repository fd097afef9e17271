"""Canonical token ids: tokens whose texts differ only in case, accents, Unicode form or whitespace share an id.

Built once from a tokenizer: each id's text (``decode([id], skip_special_tokens=False)``) is normalised by
NFKC -> NFD -> strip combining marks -> lowercase -> collapse whitespace runs to one space -> strip leading and
trailing whitespace (text that is only whitespace becomes a single space), the normaliser of the Engram
reference implementation. Consequences worth knowing: " The", "the" and "THE" share an id; "\\n\\n" and " "
share one.

Ids are numbered densely 0..N-1 in order of first appearance, so the table is a pure function of the
tokenizer (and of the Unicode tables of ``tokenizers``): building it twice gives the same tensor. Tokens kept
apart on purpose, each with an id of its own: special/added-special tokens, byte fragments whose text
decodes to U+FFFD (keyed by their token string), ids the tokenizer has no token for, and ids past the
tokenizer's vocabulary when the model's embedding is larger (``vocab_size``). Checkpoints store the table
(``model.engram.canonical_ids``) so a different Unicode version can never silently move the hashes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Regex, normalizers

_WS_ONLY = "\ue000"   # private-use sentinel: whitespace-only text survives the final strip as one space


def _normaliser() -> normalizers.Normalizer:
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Replace(Regex(r"^ $"), _WS_ONLY),
        normalizers.Strip(),
        normalizers.Replace(_WS_ONLY, " "),
    ])


def normalise_text(text: str) -> str:
    """The canonical form of one token's text (see the module docstring)."""
    return _normaliser().normalize_str(text)


@dataclass(frozen=True)
class CanonicalIds:
    table: torch.Tensor      # [vocab] int64: token id -> canonical id
    num_canonical: int       # canonical ids are 0..num_canonical-1

    @property
    def vocab_size(self) -> int:
        return int(self.table.numel())


def build_canonical_ids(tokenizer: Any, vocab_size: int | None = None) -> CanonicalIds:
    """Canonical-id table for ``tokenizer`` (``tierserve.loader.tokenizer.Tokenizer`` or anything with
    ``decode``, ``convert_ids_to_tokens``, ``all_special_ids`` and ``len``).

    ``vocab_size``: the model's embedding rows when larger than the tokenizer's vocabulary; the extra ids
    get canonical ids of their own."""
    tok_vocab = len(tokenizer)
    vocab = tok_vocab if vocab_size is None else int(vocab_size)
    if vocab < tok_vocab:
        raise ValueError(f"vocab_size ({vocab}) is smaller than the tokenizer's vocabulary ({tok_vocab})")
    special = {int(i) for i in tokenizer.all_special_ids}
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        special.update(int(i) for i, t in backend.get_added_tokens_decoder().items() if t.special)
    norm = _normaliser()
    tokens = tokenizer.convert_ids_to_tokens(list(range(tok_vocab)))
    key_to_id: dict[Any, int] = {}
    table = torch.empty(vocab, dtype=torch.int64)
    for tid in range(vocab):
        key: Any
        if tid >= tok_vocab or tid in special or tokens[tid] is None:
            key = ("own", tid)
        else:
            text = tokenizer.decode([tid], skip_special_tokens=False)
            if "\ufffd" in text:
                key = ("bytes", tokens[tid])
            else:
                key = norm.normalize_str(text) or text
        cid = key_to_id.get(key)
        if cid is None:
            cid = key_to_id[key] = len(key_to_id)
        table[tid] = cid
    return CanonicalIds(table=table, num_canonical=len(key_to_id))
