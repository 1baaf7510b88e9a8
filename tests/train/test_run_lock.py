"""One training per run dir: a second one is refused while the first runs, and a lock left by a
killed process blocks nothing."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import synthetic
from hybrid_lm.train import cli, distributed
from hybrid_lm.train.checkpoint import load_model_state
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.loop import train

HERE = Path(__file__).resolve().parent


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited before {what}: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


@pytest.mark.slow
def test_second_training_on_the_same_run_dir_is_refused_while_the_first_finishes(tmp_path):
    run_dir = tmp_path / "run"
    for name, steps in (("first", 100_000), ("second", 3)):  # without the lock the second would finish
        (tmp_path / f"{name}.json").write_text(json.dumps(synthetic.job_dict(run_dir, steps=steps, checkpoint={"every": 0})))
    command = [sys.executable, str(HERE / "run_synthetic.py")]
    first = subprocess.Popen([*command, str(tmp_path / "first.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env())
    try:
        _wait_for(lambda: _logged_steps(run_dir), first, "the first training's first step")
        second = subprocess.run([*command, str(tmp_path / "second.json")], capture_output=True, text=True, env=_env(),
                                timeout=300)
        assert second.returncode != 0
        assert f"another training is running in {run_dir} (pid {first.pid} on host" in second.stderr
        assert first.poll() is None, "the first training died"
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    steps = _logged_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # one writer: no second run's rows interleaved
    assert load_model_state(run_dir).step == steps[-1]


def test_cli_refuses_with_exit_4_and_a_killed_holder_blocks_nothing(tmp_path, capsys, monkeypatch):
    # the CLI tears down the process group at exit; DeepSpeed's cached groups would go stale for the
    # trainings that follow in this test process
    monkeypatch.setattr(distributed, "destroy_distributed", lambda: None)
    run_dir = tmp_path / "run"
    job = tmp_path / "job.json"
    job.write_text(json.dumps(synthetic.job_dict(run_dir, steps=2)))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from hybrid_lm.train.run_lock import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
         "print('locked', flush=True); time.sleep(600)", str(run_dir / "train.lock")],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = argparse.Namespace(config=str(job), overrides=[], nproc_per_node=0, print_config=False)
        assert cli.main(args) == 4
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"(pid {holder.pid} on host" in err, err
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert f'"pid": {holder.pid}' in (run_dir / "train.lock").read_text()  # the dead holder's record stays
    result = train(job_config_from_dict(json.loads(job.read_text())), make_loader=synthetic.factory())
    assert result.step == 2
