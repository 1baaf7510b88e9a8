"""``hybrid-lm recursive init``: a pretrained model -> a relaxed recursive model dir (Bae et al., ICLR 2025).

    hybrid-lm recursive init runs/tiny runs/tiny-rec --loops 2 --method average --lora-rank 32
    hybrid-lm train configs/tiny.yaml model.layer_pattern=... train.init_from=runs/tiny-rec

SRC is a training run or checkpoint dir (any layout ``hybrid-lm export`` reads) or a model-only dir
(``hybrid-lm import`` of a Hugging Face Llama, say). OUT is a model-only dir whose
``model_config.json`` holds the shared block pattern and ``recursion`` section, so a training config
for it takes ``model`` from that file (the summary line prints the overrides to use). The math lives
in ``models/recursive/convert.py``; this module only reads, converts, writes and reports.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.model_dir import ExportError, is_model_dir, load_model_dir, save_model_dir
from hybrid_lm.models.recursive.convert import METHODS, convert_to_recursive, parameter_counts


def load_source(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[Path]]:
    """(config, state dict, tokenizer dir) of a model-only dir, training run or checkpoint."""
    if is_model_dir(path):
        return load_model_dir(path)
    from hybrid_lm.train.checkpoint import load_model_state

    loaded = load_model_state(path)
    return loaded.model_config, loaded.state_dict, loaded.tokenizer_dir


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="convert a pretrained model into a looped one with SVD-initialised LoRA")
    init.add_argument("src", type=Path, help="training run/checkpoint dir or model-only dir")
    init.add_argument("out", type=Path, help="model-only dir to write (train.init_from accepts it)")
    init.add_argument("--loops", type=int, required=True, help="times the shared block is applied (divides the depth)")
    init.add_argument("--method", choices=METHODS, default="average",
                      help="shared-block init: stepwise (best without LoRA), average (best with LoRA), lower")
    init.add_argument("--lora-rank", type=int, default=0, help="per-loop LoRA rank (0: strict tying)")
    init.add_argument("--lora-targets", nargs="+", default=["*"],
                      help="fnmatch patterns on linear paths inside a block (default: every linear)")
    init.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def main(args: argparse.Namespace) -> int:
    try:
        config, state, tokenizer_dir = load_source(args.src)
        target, converted = convert_to_recursive(config, state, loops=args.loops, method=args.method,
                                                 lora_rank=args.lora_rank, lora_targets=args.lora_targets)
        save_model_dir(args.out, target, converted, tokenizer_dir, force=args.force)
    except (ExportError, ValueError, FileNotFoundError) as exc:
        print(f"hybrid-lm recursive: error: {exc}", file=sys.stderr)
        return 1
    with torch.device("meta"):
        source_params = HybridLM(config).num_params()
        counts = parameter_counts(HybridLM(target))
    print(f"converted {args.src} ({config.block_pattern!r}, {source_params:,} parameters) -> {args.out}: "
          f"block {target.layer_pattern!r} x {args.loops} loops ({args.method}), LoRA rank {args.lora_rank}; "
          f"{counts['unique']:,} unique parameters ({counts['lora']:,} LoRA), {counts['unrolled']:,} unrolled")
    print(f"train it with: model.layer_pattern={target.layer_pattern} model.recursion.loops={args.loops} "
          f"model.recursion.lora_rank={args.lora_rank} train.init_from={args.out}")
    return 0
