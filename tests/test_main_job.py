"""The README's main job, end to end on the debug config: shards, train, eval, export, check."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_on_debug_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_lm.cli", "run", str(ROOT / "configs/debug.yaml"), "--artifacts", str(tmp_path),
         "train.steps=20", "eval.every=10"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "transformers logits within" in out
    start, end = _val_losses(out)
    assert end < start - 0.5, out
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BambaForCausalLM"]


def _val_losses(out: str) -> tuple[float, float]:
    line = next(l for l in out.splitlines() if "val loss:" in l)
    # "  val loss:     5.4676 at step 0 -> 1.9314 at step 300"
    before, after = line.split("val loss:")[1].split("->")
    return float(before.split()[0]), float(after.split()[0])
