"""Relaxed recursive transformers on the embedded corpus: convert a trained model, then uptrain.

Run: ``python bench/bench_recursive.py`` (``--quick`` for a smoke run; ``--steps``/``--uptrain``).

1. Trains a plain 4-block-pair hybrid ``M-A-M-A-`` (configs/tiny.yaml widths, d_model 192) on the
   embedded stdlib corpus through the real engine.
2. Converts it to the shared block ``M-A-`` looped twice (``hybrid-lm recursive init``'s function):
   stepwise at rank 0 (the paper's best init for strict tying) and average + SVD-initialised LoRA at
   ranks 0, 8 and 32 (its best for the relaxed model).
3. For each, and for the original as the baseline, reports unique parameters, the validation loss
   right after conversion, and after the same short uptraining (the original continues training
   for as many steps, so the comparison spends equal compute on each row).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hybrid_lm.data.writer import build_shards
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.model_dir import save_model_dir
from hybrid_lm.models.recursive.convert import convert_to_recursive, parameter_counts
from hybrid_lm.train.checkpoint import load_model_state
from hybrid_lm.train.config import load_job_config
from hybrid_lm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, name: str, steps: int, overrides: list[str]):  # type: ignore[no-untyped-def]
    cfg = load_job_config(ROOT / "configs/tiny.yaml", [
        f"data.path={tmp / 'shards'}", f"train.steps={steps}", f"train.run_dir={tmp / name}",
        "train.eval_at_start=true", "eval.every=0", "eval.max_batches=16", "eval.hooks=[val_loss]",
        f"checkpoint.every={steps}", "logging.tensorboard=false", "logging.every=50",
        f"schedule.warmup_steps={max(1, steps // 10)}", *overrides])
    # one process group for all runs: DeepSpeed caches its groups process-wide, so a destroyed and
    # re-created default group would leave it pointing at the old one
    return train(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 + 10 steps")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the original model")
    parser.add_argument("--uptrain", type=int, default=100, help="uptraining steps after conversion")
    args = parser.parse_args()
    steps, uptrain = (20, 10) if args.quick else (args.steps, args.uptrain)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        build_shards("stdlib", tmp / "shards", max_bytes=8_000_000, val_fraction=0.02, progress=False)
        started = time.perf_counter()
        source = run(tmp, "source", steps, ["model.layer_pattern=M-A-M-A-"])
        loaded = load_model_state(source.checkpoint)
        print(f"\n## relaxed recursive: M-A-M-A- trained {steps} steps, converted to M-A- x 2, uptrained "
              f"{uptrain} steps (configs/tiny.yaml widths, seq 256, batch 8)")
        print("| model | unique params | val loss after conversion | after uptraining |")
        print("|---|---|---|---|")
        with torch.device("meta"):
            n_source = HybridLM(loaded.model_config).num_params()
        cont = run(tmp, "continued", uptrain, ["model.layer_pattern=M-A-M-A-", f"train.init_from={source.checkpoint}"])
        print(f"| original M-A-M-A- | {n_source:,} | {cont.evals[0]['val_loss']:.3f} | "
              f"{cont.evals[uptrain]['val_loss']:.3f} |", flush=True)
        for method, rank in (("stepwise", 0), ("average", 0), ("average", 8), ("average", 32)):
            config, state = convert_to_recursive(loaded.model_config, loaded.state_dict, loops=2, method=method,
                                                 lora_rank=rank)
            model_dir = save_model_dir(tmp / f"rec_{method}_{rank}", config, state)
            with torch.device("meta"):
                counts = parameter_counts(HybridLM(config))
            result = run(tmp, f"up_{method}_{rank}", uptrain, [
                "model.layer_pattern=M-A-", "model.recursion.loops=2", f"model.recursion.lora_rank={rank}",
                f"train.init_from={model_dir}"])
            print(f"| {method}, LoRA rank {rank} | {counts['unique']:,} | {result.evals[0]['val_loss']:.3f} | "
                  f"{result.evals[uptrain]['val_loss']:.3f} |", flush=True)
        print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
