"""Shared by the launch tests that run the real trainer (test_train_launch.py, test_slurm.py).

A small shard set from the embedded corpus, the debug config cut to seconds (no evals, one final
checkpoint, a metrics line per step), and the per-step losses read back from ``metrics.jsonl``.
The launchers are compared through what rank 0 logs: ``train/loss`` is the mean over every rank's
micro-batches and ``train/tokens`` counts the tokens of every rank, so both see the world size.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "debug.yaml"
#: tokens one rank trains on per step with CONFIG (data.micro_batch_size x data.seq_len, no accumulation)
TOKENS_PER_RANK_STEP = 4 * 64


def build_data(out: Path) -> Path:
    """About half a million byte-level tokens: enough for a few hundred debug steps on two ranks."""
    from hybrid_lm.data.writer import build_shards

    build_shards("stdlib", out, max_docs=20, shard_tokens=20_000, val_fraction=0.1, progress=False)
    return out


def overrides(data: Path, run_dir: Path, steps: int) -> list[str]:
    return [f"data.path={data}", f"train.run_dir={run_dir}", f"train.steps={steps}", "eval.every=0",
            "eval.hooks=[]", "checkpoint.every=0", "logging.every=1"]


def launch_env(**extra: str) -> dict[str, str]:
    """The test's environment without the torchrun variables of any enclosing job, one thread per rank
    (CPU results must not depend on thread counts), and this interpreter for the launch scripts."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def step_logs(run_dir: Path) -> dict[int, dict]:
    """Rank 0's metrics line of every step; a step logged twice (work redone after a failure) raises."""
    logs: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" not in record:
            continue
        assert record["step"] not in logs, f"step {record['step']} logged twice in {run_dir}"
        logs[record["step"]] = record
    return logs


def step_losses(run_dir: Path) -> dict[int, float]:
    return {step: record["train/loss"] for step, record in step_logs(run_dir).items()}
