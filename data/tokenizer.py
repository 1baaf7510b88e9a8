"""Tokenizers: byte-level (default), locally trained BPE, or any ``tokenizer.json``.

Every tokenizer is one Hugging Face ``tokenizers.Tokenizer`` saved as ``tokenizer.json`` next to
the shards, so there is a single file format to fingerprint, ship and export. The byte-level
tokenizer is built as such a Tokenizer too: a BPE model with no merges whose vocab is the 256
ByteLevel-alphabet symbols with id == byte value, plus ``<|endoftext|>`` (256) and ``<|pad|>``
(257). Encoding it through HF is exact but slow for 30 MB of text, so ``encode`` takes a fast path
(``text.encode("utf-8")``) when the fingerprint says the tokenizer is the canonical byte-level one;
a test checks both paths agree.

Special tokens are *not* recognised inside document text (``encode_special_tokens``): a source
file that contains the literal string ``<|endoftext|>`` must not end its document early.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from hybrid_lm.data.errors import DataError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
FILE_NAME = "tokenizer.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char table, the alphabet of the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _canonical(hf: HFTokenizer) -> str:
    return json.dumps(json.loads(hf.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _add_specials(hf: HFTokenizer) -> None:
    hf.add_special_tokens([AddedToken(EOS, special=True, normalized=False),
                           AddedToken(PAD, special=True, normalized=False)])
    hf.encode_special_tokens = True


def build_byte_level() -> HFTokenizer:
    """The byte-level tokenizer as an HF Tokenizer: ids 0..255 are bytes, 256 eos, 257 pad."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    _add_specials(hf)
    return hf


@lru_cache(maxsize=1)
def _byte_level_fingerprint() -> str:
    return hashlib.sha256(_canonical(build_byte_level()).encode()).hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a ByteLevel BPE on ``texts``; specials get ids 0 (eos) and 1 (pad)."""
    if vocab_size < 258:
        raise DataError(f"BPE vocab size must be >= 258 (256 bytes + 2 specials), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    hf.encode_special_tokens = True
    return hf


class Tokenizer:
    """Thin wrapper over one HF ``tokenizers.Tokenizer`` with the ids the pipeline needs."""

    def __init__(self, hf: HFTokenizer) -> None:
        hf.encode_special_tokens = True
        self.hf = hf
        eos, pad = hf.token_to_id(EOS), hf.token_to_id(PAD)
        if eos is None:
            raise DataError(f"tokenizer has no {EOS} token (needed as the end-of-document id)")
        self.eos_id: int = eos
        self.pad_id: int = pad if pad is not None else eos
        self._fingerprint = hashlib.sha256(_canonical(hf).encode()).hexdigest()
        self.is_byte_level: bool = self._fingerprint == _byte_level_fingerprint()

    # construction -------------------------------------------------------------------------------
    @classmethod
    def byte_level(cls) -> "Tokenizer":
        return cls(build_byte_level())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        return cls(train_bpe(texts, vocab_size))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Tokenizer":
        """From a ``tokenizer.json`` file or a folder containing one."""
        p = Path(path)
        if p.is_dir():
            p = p / FILE_NAME
        if not p.is_file():
            raise DataError(f"tokenizer file not found: {p}")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except Exception as exc:  # the HF error says little about which file
            raise DataError(f"cannot load tokenizer {p}: {exc}") from exc

    @classmethod
    def from_spec(cls, spec: str) -> "Tokenizer":
        """``byte`` or a path; ``bpe`` needs a corpus and is handled by the writer."""
        if spec == "byte":
            return cls.byte_level()
        return cls.load(spec)

    # use ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def token_dtype(self) -> type:
        """Storage dtype of token ids in shards: uint16 when every id fits, else uint32."""
        return np.uint16 if self.vocab_size <= 65536 else np.uint32

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D int64 array (no eos appended)."""
        if self.is_byte_level:
            return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        """sha256 of the canonical (sorted-key) tokenizer.json text."""
        return self._fingerprint

    def save(self, directory: Union[str, Path]) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / FILE_NAME
        path.write_text(_canonical(self.hf), encoding="utf-8")
        return path

    def to_hf(self, out_dir: Union[str, Path]) -> Path:
        """Write a folder loadable by ``transformers.AutoTokenizer.from_pretrained`` offline: eos
        named as bos too (the byte-level vocab has no other), pad when the vocab has one."""
        pad = PAD if self.hf.token_to_id(PAD) is not None else EOS
        return save_for_transformers(self.hf, out_dir, {"bos_token": EOS, "eos_token": EOS, "pad_token": pad,
                                                        "unk_token": None})


def save_for_transformers(hf: HFTokenizer, out_dir: Union[str, Path], specials: dict[str, Optional[str]]) -> Path:
    """Write ``hf`` as a folder that ``transformers.AutoTokenizer.from_pretrained`` loads offline:
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` through
    ``PreTrainedTokenizerFast``, with the special tokens named by ``specials`` (``{"eos_token":
    "</s>", ...}``; None leaves one unnamed). ``hf`` itself is not changed. Used for a run's
    tokenizer (``Tokenizer.to_hf``) and by the export for a bare ``tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast  # heavy; only exports need it

    fast = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(hf.to_str()), **specials)
    fast.save_pretrained(str(out_dir))
    out = Path(out_dir)
    # transformers >= 5 no longer writes this file; older loaders and other tools still read it
    if not (out / "special_tokens_map.json").exists():
        named = {name: text for name, text in specials.items() if text is not None}
        (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2) + "\n", encoding="utf-8")
    return out


def encode_documents(tok: Tokenizer, texts: Iterable[str]) -> Iterator[np.ndarray]:
    """Each text as ids with eos appended, shape (len + 1,)."""
    for text in texts:
        ids = tok.encode_array(text)
        yield np.append(ids, tok.eos_id)


def load_optional(path: Union[str, Path]) -> Optional[Tokenizer]:
    p = Path(path)
    return Tokenizer.load(p) if (p / FILE_NAME if p.is_dir() else p).is_file() else None
