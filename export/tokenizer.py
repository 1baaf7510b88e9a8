"""Tokenizer files of an export: what ``AutoTokenizer.from_pretrained(OUT_DIR)`` needs offline.

A source tokenizer is one of three kinds (``tokenizer_kind``):

``hf``
    a transformers tokenizer folder (``tokenizer_config.json`` next to ``tokenizer.json``), as
    ``hybrid-lm import`` copies it from the source model. Its files are copied unchanged, so the
    export tokenizes exactly as the source did (``<s>``/``</s>``, ``<|end_of_text|>``, added
    tokens, chat template); the data package's ``<|endoftext|>`` rule does not apply.
``hybrid-lm``
    a run's ``tokenizer.json`` (it has ``<|endoftext|>``): the data package's ``Tokenizer.to_hf``
    writes ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` with eos
    (also as bos, the byte-level vocab has no other) and pad named.
``bare``
    any other lone ``tokenizer.json``: wrapped in ``PreTrainedTokenizerFast`` with the specials
    named after the ids below, by the same writer as ``to_hf`` (``save_for_transformers``).

bos/eos/pad ids: what the import recorded from the source model (``special_token_ids.json``, read
by the caller), else the tokenizer's own: the names in ``tokenizer_config.json`` (``hf``), the data
package's eos/pad (``hybrid-lm``), well-known names such as ``</s>`` (``bare``). The same ids go into
``config.json`` and ``generation_config.json`` so that ``generate`` stops at eos and pads with pad.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from tokenizers import Tokenizer as HFTokenizer

from hybrid_lm.data.tokenizer import EOS, Tokenizer, save_for_transformers
from hybrid_lm.models.model_dir import TOKENIZER, ExportError, SpecialIds, copy_tokenizer_files, read_json_object

KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
TOKENIZER_CONFIG = "tokenizer_config.json"
#: names tried for a bare tokenizer.json, which says nothing about its specials (e.g. one that
#: ``hybrid-lm import`` copied before it recorded the source's ids)
WELL_KNOWN = {"bos_token_id": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
              "eos_token_id": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
              "pad_token_id": ("<pad>", "<|pad|>", "<|padding|>")}


def no_ids() -> SpecialIds:
    return {key: None for key in KEYS}


def _load(tokenizer_dir: Path) -> HFTokenizer:
    path = Path(tokenizer_dir) / TOKENIZER
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers error does not name the file
        raise ExportError(f"{path}: cannot load tokenizer ({exc})") from exc


def tokenizer_kind(tokenizer_dir: Optional[Path]) -> Optional[str]:
    """``hf``, ``hybrid-lm`` or ``bare`` (see the module docstring); None without a tokenizer."""
    if tokenizer_dir is None:
        return None
    if (Path(tokenizer_dir) / TOKENIZER_CONFIG).is_file():
        return "hf"
    return "hybrid-lm" if _load(tokenizer_dir).token_to_id(EOS) is not None else "bare"


def _token_text(value: Any) -> Optional[str]:
    # tokenizer_config.json holds a special token as its text or, in older files, an AddedToken dict
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids_from_tokenizer_config(tokenizer_dir: Path) -> SpecialIds:
    config = read_json_object(Path(tokenizer_dir) / TOKENIZER_CONFIG)
    hf = _load(tokenizer_dir)
    ids = no_ids()
    for key in KEYS:
        text = _token_text(config.get(key.removesuffix("_id")))
        ids[key] = hf.token_to_id(text) if text else None
    return ids


def _ids_by_well_known_names(tokenizer_dir: Path) -> SpecialIds:
    hf = _load(tokenizer_dir)
    ids, found = no_ids(), []
    for key, names in WELL_KNOWN.items():
        name = next((n for n in names if hf.token_to_id(n) is not None), None)
        if name is not None:
            ids[key] = hf.token_to_id(name)
            found.append(f"{key.removesuffix('_token_id')}={name}")
    print(f"[export] note: {tokenizer_dir / TOKENIZER} names no special tokens; taken by their usual names: "
          f"{', '.join(found) or 'none found'}", file=sys.stderr, flush=True)
    return ids


def special_token_ids(tokenizer_dir: Optional[Path], recorded: Optional[SpecialIds] = None) -> SpecialIds:
    """bos/eos/pad ids for the export: ``recorded`` (what the import read from the source model)
    when given, else the tokenizer's own (all None without a tokenizer)."""
    if recorded is not None:
        return {key: recorded.get(key) for key in KEYS}
    kind = tokenizer_kind(tokenizer_dir)
    if kind is None:
        return no_ids()
    if kind == "hf":
        return _ids_from_tokenizer_config(tokenizer_dir)
    if kind == "bare":
        return _ids_by_well_known_names(tokenizer_dir)
    tok = Tokenizer.load(tokenizer_dir)
    # to_hf names eos as bos too (byte-level vocab has no separate bos)
    return {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def source_special_ids(hf_dir: Path, hf_config: dict[str, Any]) -> SpecialIds:
    """bos/eos/pad of a transformers model folder, per id the first of: ``generation_config.json``
    (what ``generate`` used), the model config, the tokenizer's named tokens. ``hybrid-lm import``
    records these so that the export stops and pads where the source model did."""
    gen_file = Path(hf_dir) / "generation_config.json"
    sources = [read_json_object(gen_file) if gen_file.is_file() else {}, hf_config]
    if (Path(hf_dir) / TOKENIZER).is_file() and (Path(hf_dir) / TOKENIZER_CONFIG).is_file():
        sources.append(_ids_from_tokenizer_config(hf_dir))
    return {key: next((s[key] for s in sources if s.get(key) is not None), None) for key in KEYS}


def ids_outside_vocab(special_ids: SpecialIds, vocab_size: int) -> dict[str, Any]:
    """The ids (eos may be a list) that the model's embedding has no row for."""
    def outside(value: Any) -> bool:
        values = value if isinstance(value, list) else [value]
        return any(v is not None and not 0 <= v < vocab_size for v in values)

    return {key: value for key, value in special_ids.items() if outside(value)}


def _token_name(hf: HFTokenizer, token_id: Any) -> Optional[str]:
    # eos may be several ids (Llama 3 stops at each); a tokenizer names one eos token, the first
    if isinstance(token_id, list):
        token_id = token_id[0] if token_id else None
    return hf.id_to_token(token_id) if token_id is not None else None


def _wrap_bare(tokenizer_dir: Path, out_dir: Path, special_ids: SpecialIds) -> None:
    hf = _load(tokenizer_dir)
    names = {key.removesuffix("_id"): _token_name(hf, special_ids.get(key)) for key in KEYS}
    save_for_transformers(hf, out_dir, names)


def write_tokenizer(tokenizer_dir: Optional[Path], out_dir: Path, special_ids: SpecialIds) -> Optional[str]:
    """Write the HF tokenizer files into ``out_dir``; returns the kind written (None: no tokenizer)."""
    kind = tokenizer_kind(tokenizer_dir)
    out_dir = Path(out_dir)
    if kind == "hf":
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)
    elif kind == "bare":
        _wrap_bare(Path(tokenizer_dir), out_dir, special_ids)
    elif kind == "hybrid-lm":
        Tokenizer.load(tokenizer_dir).to_hf(out_dir)
    return kind
