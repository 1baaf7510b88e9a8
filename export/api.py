"""``export_checkpoint``: a training checkpoint (or model-only dir) -> a Hugging Face folder.

Steps: read the weights (``load_model_state`` for run/checkpoint dirs, any ZeRO stage, or
``load_model_dir``), check them against the config (names and shapes, so a mismatch is reported
here rather than as a confusing load error later), pick the adapter for the layer pattern
(``adapters.select``), write the model, then the tokenizer files and ``generation_config.json``.
The output folder is written only after the checks pass; an existing non-empty one is refused
unless ``force``. A source without a tokenizer still exports (the weights are the point), with a
warning on stderr and ``"tokenizer": null`` in ``hybrid_lm_export.json``. That file also records
the training ``step`` exported (a run dir means its newest complete checkpoint; null for a
model-only dir), since neither the folder nor the HF config says it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch

from hybrid_lm.export.adapters import select
from hybrid_lm.export.tokenizer import ids_outside_vocab, special_token_ids, write_tokenizer
from hybrid_lm.export.weights import parse_dtype
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.model_dir import (ExportError, SpecialIds, check_state_dict, is_model_dir, load_model_dir,
                                        prepare_out_dir, recorded_special_ids)
from hybrid_lm.train.checkpoint import load_model_state


def read_source(checkpoint: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[Path], Optional[int]]:
    """(config, fp32 state dict with our names, tokenizer dir or None, training step or None for a
    model-only dir) of a checkpoint or model dir."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ExportError(f"{checkpoint}: does not exist")
    if is_model_dir(checkpoint):
        return (*load_model_dir(checkpoint), None)
    loaded = load_model_state(checkpoint)
    tok = loaded.tokenizer_dir if (Path(loaded.tokenizer_dir) / "tokenizer.json").is_file() else None
    return loaded.model_config, loaded.state_dict, tok, loaded.step


def _write_generation_config(out_dir: Path, special_ids: SpecialIds) -> None:
    from transformers import GenerationConfig

    ids = {k: v for k, v in special_ids.items() if v is not None}
    GenerationConfig(**ids).save_pretrained(str(out_dir))


def _special_ids(checkpoint: Path, tokenizer_dir: Optional[Path], config: ModelConfig) -> SpecialIds:
    # an imported model dir recorded the source model's ids; they beat what the tokenizer suggests
    recorded = recorded_special_ids(checkpoint) if is_model_dir(checkpoint) else None
    special_ids = special_token_ids(tokenizer_dir, recorded)
    too_large = ids_outside_vocab(special_ids, config.vocab_size)
    if too_large:
        origin = f"the ids recorded in {checkpoint} at import" if recorded else f"tokenizer in {tokenizer_dir}"
        raise ExportError(f"{origin} does not fit the model: {too_large} outside the model's "
                          f"vocab_size={config.vocab_size} (was the run trained with another tokenizer?)")
    return special_ids


def _warn_no_tokenizer(checkpoint: Path, out_dir: Path) -> None:
    print(f"[export] warning: {checkpoint} carries no tokenizer.json, so {out_dir} gets no tokenizer files and "
          f"AutoTokenizer.from_pretrained({str(out_dir)!r}) will fail; export from a source that has its "
          f"tokenizer.json, or save the tokenizer the model was trained with into {out_dir}", file=sys.stderr, flush=True)


def export_checkpoint(checkpoint: Path, out_dir: Path, *, force: bool = False, dtype: str = "float32",
                      max_shard_size: int | str = "2GB", target: str = "auto") -> Path:
    """Write a folder that ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load offline.

    ``target``: ``auto`` (exact native transformers class when one exists, else remote code),
    ``native`` (refuse without one), or an adapter name (``llama``, ``mamba2``, ``bamba``, ``remote``).
    Returns ``out_dir``. Without a tokenizer in the source, warns and writes no tokenizer files.
    """
    out_dir = Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    config, state_dict, tokenizer_dir, step = read_source(checkpoint)
    check_state_dict(config, state_dict)
    adapter = select(config, target)
    special_ids = _special_ids(Path(checkpoint), tokenizer_dir, config)
    prepare_out_dir(out_dir, force)
    tokenizer_kind = write_tokenizer(tokenizer_dir, out_dir, special_ids)
    if tokenizer_kind is None:
        _warn_no_tokenizer(Path(checkpoint), out_dir)
    adapter.write(out_dir, config, state_dict, dtype=torch_dtype, max_shard_size=max_shard_size,
                  special_ids=special_ids)
    _write_generation_config(out_dir, special_ids)
    (out_dir / "hybrid_lm_export.json").write_text(json.dumps(
        {"source": str(Path(checkpoint).resolve()), "step": step, "adapter": adapter.name, "hf_class": adapter.hf_class,
         "layer_pattern": config.layer_pattern, "dtype": dtype, "tokenizer": tokenizer_kind}, indent=2) + "\n")
    return out_dir
