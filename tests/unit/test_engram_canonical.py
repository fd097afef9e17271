"""Canonical token ids: case/accent/Unicode-form variants share an id, special tokens keep their own."""
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models

from tests.helpers.tiny_tokenizer import SPECIAL_TOKENS, make_tokenizer_dir
from tierserve.loader.tokenizer import Tokenizer
from tierserve.memory.engram_canonical import build_canonical_ids, normalise_text

WORDS = ["<|bos|>", "<|BOS|>", "<|eos|>", "Hello", "hello", "HELLO", "Ｈｅｌｌｏ", "café", "cafe", "CAFÉ",
         "cafe\u0301", "naïve", "naive", "ﬁ", "fi", "the", "The", "Straße", "strasse", "a\u00a0b", "a b", "x", "y"]


def _word_tokenizer() -> Tokenizer:
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="x"))
    cfg = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "additional_special_tokens": ["<|BOS|>"]}
    return Tokenizer(backend, cfg)


def test_variants_map_together_specials_separate():
    tok = _word_tokenizer()
    can = build_canonical_ids(tok)
    cid = {w: int(can.table[i]) for i, w in enumerate(WORDS)}
    assert cid["Hello"] == cid["hello"] == cid["HELLO"] == cid["Ｈｅｌｌｏ"]
    assert cid["café"] == cid["cafe"] == cid["CAFÉ"] == cid["cafe\u0301"]
    assert cid["naïve"] == cid["naive"] and cid["ﬁ"] == cid["fi"] and cid["the"] == cid["The"]
    assert cid["a\u00a0b"] == cid["a b"]
    assert cid["Straße"] != cid["strasse"]          # lowercase, not case folding: ß stays
    assert len({cid["<|bos|>"], cid["<|BOS|>"], cid["<|eos|>"]}) == 3
    assert cid["x"] != cid["y"] != cid["hello"]
    assert can.num_canonical == len(set(cid.values())) == int(can.table.max()) + 1
    assert normalise_text("  Ångström\t\n  Über ") == "angstrom uber"
    assert normalise_text("\n\n") == " "


def test_bpe_tokenizer_round_trip_and_model_vocab(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path))
    a, b = build_canonical_ids(tok), build_canonical_ids(Tokenizer.from_dir(tmp_path))
    assert torch.equal(a.table, b.table) and a.num_canonical == b.num_canonical
    assert a.table.dtype == torch.int64 and a.vocab_size == len(tok)
    assert a.num_canonical < len(tok)          # some ids merge (e.g. "The" / "the" / " the")
    specials = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    sc = a.table[specials].tolist()
    assert len(set(sc)) == len(sc)
    others = [i for i in range(len(tok)) if i not in specials]
    assert not set(sc) & set(a.table[others].tolist())
    big = build_canonical_ids(tok, vocab_size=len(tok) + 5)
    assert torch.equal(big.table[:len(tok)], a.table)
    assert big.table[len(tok):].tolist() == list(range(a.num_canonical, a.num_canonical + 5))
