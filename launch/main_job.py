"""``hybrid-lm run [CONFIG] [overrides]``: the main job, end to end on one machine.

    hybrid-lm run                                  # configs/tiny.yaml, CPU, about 10 minutes on 2 cores
    hybrid-lm run configs/debug.yaml train.steps=20

1. builds byte-level shards from the embedded stdlib corpus into ``artifacts/data/`` (skipped when
   a manifest is already there),
2. trains in this process (``artifacts/run/``: metrics.jsonl, checkpoints/),
3. reports the validation loss before the first step and after the last,
4. exports the final checkpoint to a Hugging Face folder in ``artifacts/hf/`` (when the export
   package is installed; otherwise says so and skips),
and prints where everything is. Re-running resumes the finished run (nothing left to train) and
re-exports; delete ``artifacts/run`` to train again.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="job config (default configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--artifacts", default="artifacts", help="where data/, run/ and hf/ go")


def _ensure_shards(data_dir: Path) -> None:
    if (data_dir / "manifest.json").is_file():
        print(f"[run] shards already in {data_dir}", flush=True)
        return
    print(f"[run] building shards from the embedded stdlib corpus into {data_dir}", flush=True)
    cmd = [sys.executable, "-m", "hybrid_lm.cli", "data", "build", "--input", "stdlib", "--out", str(data_dir)]
    subprocess.run(cmd, check=True)


def _val_loss(scores: Optional[dict[str, float]]) -> Optional[float]:
    """The validation loss among the eval scores (hooks name it like ``val/loss``)."""
    if not scores:
        return None
    keys = sorted(k for k in scores if "loss" in k and "val" in k and "bucket" not in k and "pos" not in k)
    return scores[keys[0]] if keys else None


def _export(checkpoint: Path, out_dir: Path) -> Optional[Path]:
    try:
        from hybrid_lm.export.api import export_checkpoint
    except ModuleNotFoundError as exc:
        print(f"[run] export skipped: the export package is not installed yet ({exc.name})", flush=True)
        return None
    return export_checkpoint(checkpoint, out_dir, force=True)


def main(args: argparse.Namespace) -> int:
    from hybrid_lm.train.config import load_job_config
    from hybrid_lm.typed_config import ConfigError

    started = time.perf_counter()
    artifacts = Path(args.artifacts)
    data_dir, run_dir, hf_dir = artifacts / "data", artifacts / "run", artifacts / "hf"
    overrides = [f"data.path={data_dir}", f"train.run_dir={run_dir}", *args.overrides]
    try:
        cfg = load_job_config(args.config, overrides)
    except ConfigError as exc:
        print(f"hybrid-lm run: config error: {exc}", file=sys.stderr)
        return 2
    _ensure_shards(Path(cfg.data.path))

    from hybrid_lm.train.distributed import destroy_distributed
    from hybrid_lm.train.loop import train

    train_started = time.perf_counter()
    try:
        result = train(cfg)
    finally:
        destroy_distributed()
    train_s = time.perf_counter() - train_started
    evals = sorted(result.evals.items())
    start = _val_loss(evals[0][1]) if evals else None
    end = _val_loss(evals[-1][1]) if evals else None
    exported = _export(result.checkpoint, hf_dir) if result.checkpoint is not None else None
    total_s = time.perf_counter() - started

    def fmt(x: Optional[float]) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"

    print("\n[run] done")
    print(f"  model:        {cfg.model.layer_pattern} d_model={cfg.model.d_model} vocab={cfg.model.vocab_size}")
    print(f"  steps:        {result.step} ({result.state.tokens:,} tokens, {result.state.nan_skipped} skipped)")
    if evals:
        print(f"  val loss:     {fmt(start)} at step {evals[0][0]} -> {fmt(end)} at step {evals[-1][0]}")
    print(f"  data:         {cfg.data.path}")
    print(f"  run dir:      {run_dir} (metrics.jsonl, checkpoints/)")
    print(f"  checkpoint:   {result.checkpoint}")
    print(f"  export:       {exported if exported else 'skipped'}")
    print(f"  wall time:    {total_s:.0f}s total, {train_s:.0f}s training", flush=True)
    return 0
