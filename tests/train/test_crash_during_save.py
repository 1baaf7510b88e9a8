"""Crash during save: SIGKILL at random points while checkpointing every step.

After each kill, ``latest`` names a complete checkpoint (or none exists yet), the newest
complete checkpoint loads, and a resumed run finishes with the same final weights as a run that
was never killed.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import synthetic
from hybrid_lm.train.checkpoint import layout, load_model_state

HERE = Path(__file__).resolve().parent
STEPS = 120


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.strip().endswith("}")), default=0)


def _run(job_file: Path, *, kill_at_step: int | None = None, jitter_s: float = 0.0) -> subprocess.CompletedProcess | None:
    """Run to the end, or SIGKILL once the metrics show ``kill_at_step`` (plus a random delay, so
    the kill lands anywhere in the step/save cycle)."""
    proc = subprocess.Popen([sys.executable, str(HERE / "run_synthetic.py"), str(job_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    if kill_at_step is None:
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    run_dir = Path(json.loads(job_file.read_text())["train"]["run_dir"])
    deadline = time.monotonic() + 120
    while _logged_steps(run_dir) < kill_at_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(jitter_s)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return None


def _assert_latest_is_complete(ckpt_root: Path) -> None:
    latest = ckpt_root / "latest"
    if latest.exists():
        named = ckpt_root / latest.read_text().strip()
        layout.verify(named)  # raises if incomplete or corrupt


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_latest_incomplete(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    for run_dir in (reference_dir, killed_dir):
        job = synthetic.job_dict(run_dir, steps=STEPS, checkpoint={"every": 1, "keep": 2})
        (run_dir.parent / f"{run_dir.name}.json").write_text(json.dumps(job))
    assert _run(tmp_path / "reference.json").returncode == 0

    rng = random.Random(0)
    ckpt_root = killed_dir / "checkpoints"
    steps_seen = []
    for _ in range(3):
        target = (max(steps_seen) if steps_seen else 0) + rng.randint(5, 25)
        _run(tmp_path / "killed.json", kill_at_step=target, jitter_s=rng.uniform(0.0, 0.05))
        _assert_latest_is_complete(ckpt_root)
        newest = layout.newest_complete(ckpt_root, report=False)
        if newest is not None:
            steps_seen.append(load_model_state(newest).step)
    print('steps at the kills:', steps_seen)
    assert steps_seen, "no checkpoint was completed before the kills; lengthen the kill delays"
    assert max(steps_seen) < STEPS, f"the run finished before a kill landed ({steps_seen}); shorten the delays"

    finished = _run(tmp_path / "killed.json")
    assert finished.returncode == 0, finished.stderr[-2000:]
    ours = load_model_state(killed_dir)
    theirs = load_model_state(reference_dir)
    assert ours.step == theirs.step == STEPS
    for name, tensor in theirs.state_dict.items():
        assert torch.equal(ours.state_dict[name], tensor), name
