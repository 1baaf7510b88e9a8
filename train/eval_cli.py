"""``hybrid-lm eval CHECKPOINT [key.sub=value ...]``: run the eval hooks on a saved checkpoint.

    hybrid-lm eval runs/tiny                              # newest complete checkpoint of a run
    hybrid-lm eval runs/tiny/checkpoints/step-0000300 eval.max_batches=20 data.path=other/shards

Loads consolidated fp32 weights with ``load_model_state`` (any ZeRO stage, no DeepSpeed engine),
takes the run's own data/eval sections unless overridden, runs ``run_evals`` on the validation
split in this one process, and prints the scores as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run dir (newest complete checkpoint) or a checkpoint dir")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the saved config, e.g. eval.max_batches=10")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def main(args: argparse.Namespace) -> int:
    import torch

    from hybrid_lm.models.kinds import build_lm
    from hybrid_lm.train.build import default_loader_factory
    from hybrid_lm.train.checkpoint import CheckpointError, load_model_state
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.evaluation import EvalContext, run_evals
    from hybrid_lm.typed_config import ConfigError, apply_overrides

    try:
        loaded = load_model_state(Path(args.checkpoint))
        cfg = job_config_from_dict(apply_overrides(loaded.job_config, args.overrides))
    except (CheckpointError, ConfigError) as exc:
        print(f"hybrid-lm eval: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_lm(loaded.model_config)
    model.load_state_dict(loaded.state_dict)
    model.to(device).eval()
    make_loader = default_loader_factory(cfg.data)
    ctx = EvalContext(make_val_loader=lambda: make_loader("val", 0, 1), device=device, step=loaded.step,
                      reduce=None)
    scores = run_evals(model, cfg.eval, ctx)
    print(json.dumps({"checkpoint": str(loaded.tokenizer_dir), "step": loaded.step, **scores}, indent=1))
    return 0
