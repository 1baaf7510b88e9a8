"""``hybrid-lm import HF_DIR [OUT_DIR]``: a local transformers Llama or Mamba2 folder -> model-only dir.

    hybrid-lm import ~/models/my-llama artifacts/init-llama
    hybrid-lm import ~/models/my-llama                      # writes ./my-llama-hybrid-lm
    hybrid-lm train configs/tiny.yaml train.init_from=artifacts/init-llama model.layer_pattern=...

The config is translated by the adapter of the ``model_type`` (``export/llama.py``,
``export/mamba2.py``), which refuses features our layers lack (RoPE scaling, MLP bias, dt clamps,
...); tensors are renamed and checked against the translated config, so the result loads strictly.
Nothing is downloaded: HF_DIR must be a local folder with ``config.json`` and safetensors weights.
A fast tokenizer (``tokenizer.json`` with ``tokenizer_config.json`` etc.) is copied unchanged, and
the source's bos/eos/pad ids are recorded, so ``hybrid-lm export`` of the result tokenizes, stops and
pads as the source model did.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from hybrid_lm.export.cli import refusals
from hybrid_lm.export.llama import LlamaAdapter
from hybrid_lm.export.mamba2 import Mamba2Adapter
from hybrid_lm.export.tokenizer import source_special_ids
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.model_dir import (HF_TOKENIZER_FILES, TOKENIZER, ExportError, check_state_dict, prepare_out_dir,
                                        read_json_object, read_safetensors, save_model_dir)


def _adapter(model_type: str):
    adapters = {"llama": LlamaAdapter(), "mamba2": Mamba2Adapter()}
    if model_type not in adapters:
        raise ExportError(f"cannot import model_type {model_type!r} (supported: {', '.join(adapters)})")
    return adapters[model_type]


def _read_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ExportError(f"{index}: expected a JSON object with a 'weight_map' of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (hf_dir / name).is_file()]
        if missing:
            raise ExportError(f"{hf_dir / missing[0]}: named by {index} but missing")
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{hf_dir}: no model.safetensors(.index.json); only safetensors weights are imported")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(read_safetensors(hf_dir / name))
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}


def _tokenizer_dir(hf_dir: Path) -> Optional[Path]:
    if (hf_dir / TOKENIZER).is_file():
        return hf_dir
    others = [name for name in (*HF_TOKENIZER_FILES, "tokenizer.model", "vocab.json") if (hf_dir / name).is_file()]
    if others:
        # a slow-only (sentencepiece / vocab+merges) tokenizer would need converting, which we do not do
        print(f"[import] warning: {hf_dir} has {', '.join(others)} but no tokenizer.json; the tokenizer is not "
              f"imported (save a fast tokenizer into {hf_dir} first)", file=sys.stderr, flush=True)
    return None


def import_hf(hf_dir: Path, out_dir: Path, *, force: bool = False) -> tuple[ModelConfig, Path]:
    """Write our model-only directory for the HF folder ``hf_dir``; returns (config, out_dir)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir}: no config.json (a local transformers folder is needed)")
    model_type = read_json_object(hf_dir / "config.json").get("model_type", "<missing>")
    adapter = _adapter(model_type)
    from transformers import AutoConfig

    # through transformers, so legacy keys are normalised (rope_scaling -> rope_parameters, inf floats)
    try:
        hf_config = AutoConfig.from_pretrained(str(hf_dir)).to_dict()
    except Exception as exc:  # transformers' validators raise their own classes, not ValueError
        raise ExportError(f"{hf_dir / 'config.json'}: transformers rejects it: {exc}") from exc
    config = adapter.from_hf_config(hf_config)
    state = adapter.from_hf(config, _read_hf_state(hf_dir))
    if config.tie_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed.weight"]
    check_state_dict(config, state)
    special_ids = source_special_ids(hf_dir, hf_config)
    prepare_out_dir(out_dir, force)
    save_model_dir(out_dir, config, state, _tokenizer_dir(hf_dir), force=True, special_ids=special_ids)
    return config, Path(out_dir)


def default_out_dir(hf_dir: Path) -> Path:
    """``./<HF_DIR's name>-hybrid-lm``: in the working directory, never next to the source, which may
    sit in a read-only or shared place such as the Hugging Face cache."""
    hf_dir = Path(hf_dir).resolve()
    name = hf_dir.name
    # a Hub cache snapshot (models--org--name/snapshots/<commit>) is better named by its repo than its hash
    if hf_dir.parent.name == "snapshots" and hf_dir.parent.parent.name.startswith("models--"):
        name = hf_dir.parent.parent.name.split("--")[-1]
    return Path(f"{name}-hybrid-lm")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", type=Path, help="local transformers folder (Llama or Mamba2)")
    parser.add_argument("out_dir", type=Path, nargs="?", default=None,
                        help="model-only directory to write (default: ./<HF_DIR name>-hybrid-lm)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def main(args: argparse.Namespace) -> int:
    out_dir = args.out_dir if args.out_dir is not None else default_out_dir(args.hf_dir)
    try:
        config, out = import_hf(args.hf_dir, out_dir, force=args.force)
    # KeyError: a tensor the adapter expects is missing from the source
    except (*refusals(), KeyError) as exc:
        print(f"hybrid-lm import: error: {exc}", file=sys.stderr)
        return 1
    print(f"imported {args.hf_dir} -> {out} (layer_pattern {config.layer_pattern!r}, d_model {config.d_model})")
    return 0
