"""``export_checkpoint``: a training checkpoint (or model-only dir) -> a Hugging Face folder.

Steps: read the weights (``load_model_state`` for run/checkpoint dirs, any ZeRO stage, or
``load_model_dir``), check them against the config (names and shapes, so a mismatch is reported
here rather than as a confusing load error later), pick the adapter for the layer pattern
(``adapters.select``), write the model, then the tokenizer files and ``generation_config.json``.
The output folder is written only after the checks pass; an existing non-empty one is refused
unless ``force``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from hybrid_lm.export.adapters import select
from hybrid_lm.export.model_dir import ExportError, check_state_dict, is_model_dir, load_model_dir, prepare_out_dir
from hybrid_lm.export.tokenizer import special_token_ids, write_tokenizer
from hybrid_lm.export.weights import parse_dtype
from hybrid_lm.models.config import ModelConfig


def read_source(checkpoint: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[Path]]:
    """(config, fp32 state dict with our names, tokenizer dir or None) of a checkpoint or model dir."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ExportError(f"{checkpoint}: does not exist")
    if is_model_dir(checkpoint):
        return load_model_dir(checkpoint)
    from hybrid_lm.train.checkpoint import load_model_state

    loaded = load_model_state(checkpoint)
    tok = loaded.tokenizer_dir if (Path(loaded.tokenizer_dir) / "tokenizer.json").is_file() else None
    return loaded.model_config, loaded.state_dict, tok


def _write_generation_config(out_dir: Path, special_ids: dict[str, Optional[int]]) -> None:
    from transformers import GenerationConfig

    ids = {k: v for k, v in special_ids.items() if v is not None}
    GenerationConfig(**ids).save_pretrained(str(out_dir))


def export_checkpoint(checkpoint: Path, out_dir: Path, *, force: bool = False, dtype: str = "float32",
                      max_shard_size: int | str = "2GB", target: str = "auto") -> Path:
    """Write a folder that ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load offline.

    ``target``: ``auto`` (exact native transformers class when one exists, else remote code),
    ``native`` (refuse without one), or an adapter name (``llama``, ``mamba2``, ``bamba``, ``remote``).
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    config, state_dict, tokenizer_dir = read_source(checkpoint)
    check_state_dict(config, state_dict)
    adapter = select(config, target)
    special_ids = special_token_ids(tokenizer_dir)
    too_large = {k: v for k, v in special_ids.items() if v is not None and v >= config.vocab_size}
    if too_large:
        raise ExportError(f"tokenizer in {tokenizer_dir} does not fit the model: {too_large} outside the model's "
                          f"vocab_size={config.vocab_size} (was the run trained with another tokenizer?)")
    prepare_out_dir(out_dir, force)
    write_tokenizer(tokenizer_dir, out_dir)
    adapter.write(out_dir, config, state_dict, dtype=torch_dtype, max_shard_size=max_shard_size,
                  special_ids=special_ids)
    _write_generation_config(out_dir, special_ids)
    (out_dir / "hybrid_lm_export.json").write_text(json.dumps(
        {"source": str(Path(checkpoint).resolve()), "adapter": adapter.name, "hf_class": adapter.hf_class,
         "layer_pattern": config.layer_pattern, "dtype": dtype}, indent=2) + "\n")
    return out_dir
