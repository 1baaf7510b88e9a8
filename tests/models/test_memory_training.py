"""The memory letters train at their defaults: ``configs/tiny.yaml`` with each memory letter in the
pattern, 512-token rows of real text (the embedded stdlib corpus), 100 optimizer steps through the
real engine (DeepSpeed ZeRO-0, the shard loader). Every loss must be finite, no step skipped, and
the validation loss must end clearly below its step-0 value.

The micro-batch is 1 row (tiny.yaml has 8) so that six runs fit the CI budget; everything else
is tiny.yaml as users run it.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from hybrid_lm.data.writer import build_shards
from hybrid_lm.train.config import load_job_config
from hybrid_lm.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
PATTERNS = ["M-A-T-", "C-", "G-", "L-", "X-", "D-"]


@pytest.fixture(scope="module")
def stdlib_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stdlib") / "shards"
    # 3 MB of the standard library: ~5,800 rows of 512 tokens, so 100 steps never repeat a row
    build_shards("stdlib", out, max_bytes=3_000_000, val_fraction=0.02, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
def test_tiny_config_trains_with_memory_letter(pattern: str, stdlib_shards: Path, tmp_path: Path) -> None:
    cfg = load_job_config(ROOT / "configs/tiny.yaml", [
        f"model.layer_pattern={pattern}", f"data.path={stdlib_shards}", "data.seq_len=512",
        "data.micro_batch_size=1", "train.steps=100", f"train.run_dir={tmp_path}", "train.eval_at_start=true",
        "eval.every=0", "eval.max_batches=4", "eval.hooks=[val_loss]", "checkpoint.every=100",
        "logging.tensorboard=false",
    ])
    result = train(cfg)
    assert len(result.losses) == 100 and not result.stopped_by_signal
    assert all(math.isfinite(v) for v in result.losses.values()), result.losses
    assert result.state.nan_skipped == 0
    start, end = result.evals[0]["val_loss"], result.evals[100]["val_loss"]
    assert math.isfinite(end) and end < start - 1.0, (pattern, start, end)
