"""The model-only directory: our own weights and config, nothing about training.

Layout (what ``hybrid-lm import`` writes and ``train.init_from`` / ``hybrid-lm export`` read)::

    model.safetensors    our parameter names (``embed.weight``, ``blocks.{i}.layer.*``, ...)
    model_config.json    the ModelConfig as plain data (``typed_config.to_dict``)
    tokenizer.json       optional, copied from the tokenizer dir given at save time
    tokenizer_config.json, special_tokens_map.json, ...   optional, the rest of an HF tokenizer
                         folder (``hybrid-lm import`` copies them unchanged; see HF_TOKENIZER_FILES)
    special_token_ids.json   optional, bos/eos/pad ids the import read from the source model

Tied embeddings are stored once (safetensors refuses shared storage); ``load_model_dir`` puts
``lm_head.weight`` back so the state dict has the same keys as ``HybridLM.state_dict()``.

It lives in models/ because it needs only the model: train/ (``init_from``) and export/ both read
it, and neither may import the other's side for it (export/ reads training checkpoints through
``hybrid_lm.train.checkpoint``; train/ never imports export/).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.kinds import build_lm, tied_keys
from hybrid_lm.typed_config import from_dict, to_dict

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
#: the files of a transformers tokenizer folder besides tokenizer.json; copied verbatim so the
#: export tokenizes exactly as the source did (named specials, added tokens, chat template)
HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json")
SPECIAL_IDS = "special_token_ids.json"
SpecialIds = dict[str, Union[int, list[int], None]]


class ExportError(ValueError):
    """A model dir, export or import that cannot be done faithfully; the message says what
    disagrees. One type for all three, so the CLIs print each as one line."""


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ExportError naming the file when it does not parse or holds
    something else (a list, a number)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; ExportError naming it when it is truncated or not one."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own type, and its message does not name the file
        raise ExportError(f"{path}: cannot read ({exc}); truncated or not a safetensors file") from exc


def is_model_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless ``force`` (then it is emptied first)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out}: not empty (pass --force to overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def save_model_dir(out: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                   tokenizer_dir: Optional[Path] = None, *, force: bool = False,
                   special_ids: Optional[SpecialIds] = None) -> Path:
    """Write ``state_dict`` (our names) and ``config`` to ``out``; returns ``out``.

    The tokenizer files of ``tokenizer_dir`` are copied when it has a ``tokenizer.json``;
    ``special_ids`` (bos/eos/pad of the source model) are recorded for ``hybrid-lm export``."""
    out = Path(out)
    check_state_dict(config, state_dict)
    prepare_out_dir(out, force)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if config.tie_embeddings:
        tensors.pop(tied_keys(config)[1], None)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(to_dict(config), indent=2) + "\n")
    if tokenizer_dir is not None and (Path(tokenizer_dir) / TOKENIZER).is_file():
        copy_tokenizer_files(Path(tokenizer_dir), out)
    if special_ids is not None:
        (out / SPECIAL_IDS).write_text(json.dumps(special_ids, indent=2) + "\n")
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy a fast tokenizer's files (``tokenizer.json`` and its HF companions) unchanged."""
    for name in (TOKENIZER, *HF_TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def recorded_special_ids(path: Path) -> Optional[SpecialIds]:
    """The bos/eos/pad ids a model-only dir recorded at import, or None (not imported, or older)."""
    record = Path(path) / SPECIAL_IDS
    if not record.is_file():
        return None
    ids = read_json_object(record)
    return {key: ids.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def load_model_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[Path]]:
    """(config, state dict with our names, tokenizer dir or None) of a model-only directory."""
    path = Path(path)
    if not is_model_dir(path):
        raise ExportError(f"{path}: not a model-only directory (needs {CONFIG} and {WEIGHTS})")
    config = from_dict(ModelConfig, read_json_object(path / CONFIG), "model")
    state = read_safetensors(path / WEIGHTS)
    embed, head = tied_keys(config)
    if config.tie_embeddings and head not in state and embed in state:
        state[head] = state[embed]
    check_state_dict(config, state)
    return config, state, path if (path / TOKENIZER).is_file() else None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict of the model ``config`` describes, built on the meta
    device (no memory)."""
    with torch.device("meta"):
        model = build_lm(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ExportError naming missing/unexpected keys and shape mismatches against ``config``."""
    expected = expected_shapes(config)
    have = set(state_dict)
    if config.tie_embeddings:
        have.add(tied_keys(config)[1])
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} != {expected[k]}" for k in sorted(set(expected) & set(state_dict))
             if tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"shape mismatches {wrong}")
    if problems:
        raise ExportError(f"weights disagree with the config (pattern {config.layer_pattern!r}): " + "; ".join(problems))
