"""Tokenizers: byte-level ids are the UTF-8 bytes, BPE trains/saves/loads, HF export loads offline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hybrid_lm.data.tokenizer import EOS, PAD, Tokenizer, save_for_transformers

TEXTS = ["plain ascii", "héllo wörld — ✓ 日本語 🙂", "tabs\tand\nnewlines\r\n  ", "<|endoftext|> is text here", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip_and_ids_are_bytes(text):
    tok = Tokenizer.byte_level()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    # the fast path and the real HF tokenizer agree, specials inside text included
    assert tok.hf.encode(text, add_special_tokens=False).ids == ids


def test_byte_level_random_utf8():
    rng = np.random.default_rng(0)
    tok = Tokenizer.byte_level()
    for _ in range(20):
        text = "".join(chr(c) for c in rng.integers(1, 0x2FFF, size=50) if not 0xD800 <= c < 0xE000)
        assert tok.decode(tok.encode(text)) == text
        assert tok.hf.encode(text).ids == list(text.encode())


def test_byte_level_specials():
    tok = Tokenizer.byte_level()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    assert tok.hf.id_to_token(256) == EOS and tok.hf.id_to_token(257) == PAD
    assert tok.is_byte_level


def test_bpe_train_save_load(tmp_path):
    corpus = ["def function(argument):\n    return argument + 1\n"] * 50 + ["class Thing:\n    pass\n"] * 50
    tok = Tokenizer.train(corpus, vocab_size=300)
    assert 258 < tok.vocab_size <= 300 and not tok.is_byte_level
    text = "def thing(argument): return 2 ✓"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # merges happened
    assert tok.decode(ids) == text
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(text) == ids and loaded.eos_id == tok.eos_id


def test_fingerprint_is_stable_and_distinguishes(tmp_path):
    a, b = Tokenizer.byte_level(), Tokenizer.byte_level()
    assert a.fingerprint() == b.fingerprint()
    a.save(tmp_path)
    assert Tokenizer.load(tmp_path / "tokenizer.json").fingerprint() == a.fingerprint()
    assert Tokenizer.train(["abc abd abe"] * 10, 270).fingerprint() != a.fingerprint()


def test_hf_export_loads_offline(tmp_path):
    from transformers import AutoTokenizer

    tok = Tokenizer.byte_level()
    tok.to_hf(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "hf" / name).is_file()
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    text = "héllo ✓"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.eos_token_id, hf.pad_token_id) == (256, 257)
    assert hf.decode(tok.encode(text)) == text


def test_save_for_transformers_names_only_the_given_specials(tmp_path):
    """The one HF wrapper (used by to_hf and by the export of a bare tokenizer.json): unnamed
    specials stay unnamed, and the tokenizer passed in is not changed."""
    from transformers import AutoTokenizer

    tok = Tokenizer.byte_level()
    before = tok.hf.to_str()
    save_for_transformers(tok.hf, tmp_path / "hf", {"bos_token": None, "eos_token": EOS, "pad_token": None})
    assert tok.hf.to_str() == before
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert (hf.eos_token, hf.bos_token, hf.pad_token) == (EOS, None, None)
    specials = json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text())
    assert specials.get("eos_token") in (EOS, {"content": EOS}) and "pad_token" not in specials


def test_load_missing_file(tmp_path):
    from hybrid_lm.data.errors import DataError

    with pytest.raises(DataError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "nope.json")
