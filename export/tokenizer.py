"""Tokenizer files of an export: what ``AutoTokenizer.from_pretrained(OUT_DIR)`` needs offline.

A run stores only ``tokenizer.json``; the data package's ``Tokenizer.to_hf`` turns it into
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` with the special
tokens named. The same ids go into ``config.json`` and ``generation_config.json`` so that
``generate`` stops at eos and pads with pad.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

SpecialIds = dict[str, Optional[int]]


def special_token_ids(tokenizer_dir: Optional[Path]) -> SpecialIds:
    """bos/eos/pad ids of the run's tokenizer (all None without one)."""
    if tokenizer_dir is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    from hybrid_lm.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    # to_hf names eos as bos too (byte-level vocab has no separate bos)
    return {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def write_tokenizer(tokenizer_dir: Optional[Path], out_dir: Path) -> None:
    """Write the HF tokenizer files (nothing without a tokenizer)."""
    if tokenizer_dir is not None:
        from hybrid_lm.data.tokenizer import Tokenizer

        Tokenizer.load(tokenizer_dir).to_hf(out_dir)
