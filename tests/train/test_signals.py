"""SIGTERM mid-run: the trainer finishes the step, writes a complete checkpoint and exits 0."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import synthetic
from hybrid_lm.train.checkpoint import layout, load_model_state

HERE = Path(__file__).resolve().parent


def _first_metrics_line(run_dir: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().strip():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no step was logged in time")


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    job = synthetic.job_dict(run_dir, steps=100_000, checkpoint={"every": 0})
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, str(HERE / "run_synthetic.py"), str(tmp_path / "job.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _first_metrics_line(run_dir, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stop signal received; checkpoint saved" in out
    ckpt = layout.newest_complete(run_dir / "checkpoints")
    assert ckpt is not None and (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    loaded = load_model_state(run_dir)
    assert 1 <= loaded.step < 100_000
    assert loaded.state_dict["embed.weight"].shape == (64, 32)
