"""``hybrid-lm export CHECKPOINT OUT_DIR``: write a Hugging Face folder from a training checkpoint.

    hybrid-lm export runs/tiny artifacts/hf-tiny                       # newest complete checkpoint
    hybrid-lm export runs/tiny/checkpoints/step_00000100 out --dtype bfloat16 --max-shard-size 500MB
    hybrid-lm export some_model_dir out --target native                # refuse remote code

The result loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` (add
``trust_remote_code=True`` for remote-code exports) and ``AutoTokenizer.from_pretrained(OUT_DIR)``.
A source that cannot be exported (not a checkpoint, a corrupt file, weights that disagree with their
config, ...) prints one line naming the problem and exits 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybrid_lm.models.model_dir import ExportError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="run dir, checkpoint dir, or model-only dir")
    parser.add_argument("out_dir", type=Path, help="output folder (must be empty or absent)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--max-shard-size", default="2GB", help="split safetensors above this size (e.g. 500MB)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--target", default="auto",
                        help="auto | native | llama | mamba2 | bamba | remote (default: auto)")


def refusals() -> tuple[type[Exception], ...]:
    """The project's own error types: their messages name the file and the problem for the user,
    so they print as one line rather than a traceback (anything else is a bug and keeps its trace)."""
    from hybrid_lm.data.errors import DataError

    types: list[type[Exception]] = [ExportError, ValueError, FileNotFoundError, DataError]
    try:
        from hybrid_lm.train.checkpoint import CheckpointError
    except ImportError:  # a model-only dir exports without the training engine
        return tuple(types)
    return (*types, CheckpointError)


def _summary(args: argparse.Namespace, out: Path) -> str:
    import json

    info = json.loads((out / "hybrid_lm_export.json").read_text())
    tokenizer = {"hf": "tokenizer files copied from the source", "hybrid-lm": "the run's tokenizer",
                 "bare": "tokenizer.json wrapped for AutoTokenizer",
                 None: "NO TOKENIZER (AutoTokenizer.from_pretrained will fail on it)"}[info.get("tokenizer")]
    step = "model-only dir, no training step" if info.get("step") is None else f"step {info['step']}"
    return f"exported {args.checkpoint} ({step}) -> {out} as {info['hf_class']} ({info['dtype']}); tokenizer: {tokenizer}"


def main(args: argparse.Namespace) -> int:
    from hybrid_lm.export.api import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, force=args.force, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, target=args.target)
    except refusals() as exc:
        print(f"hybrid-lm export: error: {exc}", file=sys.stderr)
        return 1
    print(_summary(args, out))
    return 0
