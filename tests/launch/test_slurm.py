"""launch/slurm.sbatch on a real Slurm cluster: two slurmd "nodes" on this machine, started (or
reused) by tests/launch/slurm_local.sh, which CI (.ci/run) installs and starts before ``make test``.

1. A 2-node job (one torchrun agent per node, one rank each, gloo) trains configs/debug.yaml to the
   end: the reference losses.
2. The same job again; once it has logged a few steps the test sends SIGUSR1 to the batch shell
   only (``scancel --signal=USR1 --batch``: what slurmctld does for the script's
   ``--signal=B:USR1@120`` before the time limit, without waiting minutes for a limit). The shell
   forwards it through srun to the agents and ranks, the trainer checkpoints and exits 0, the shell
   runs ``scontrol requeue``, and the next run of the job resumes from that checkpoint and finishes.
   Its per-step losses must equal the reference bitwise (exact resume, same world size and ranks).

The test polls ``scontrol`` instead of blocking in ``sbatch --wait``: sbatch polls at 2, 10, 42,
74 ... s after submission, which would add up to half a minute per job.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import train_runs
from distributed_utils import free_port

HERE = Path(__file__).resolve().parent
SLURM_LOCAL = HERE / "slurm_local.sh"
STEPS = 100  # a few seconds of training: the signal must land well before the run would end
SIGNAL_AFTER = 3  # steps logged before SIGUSR1 is sent
JOB_TIMEOUT_S = 240
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE"}

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def slurm_env():
    if shutil.which("sbatch") is None and os.geteuid() != 0:
        pytest.skip("Slurm is not installed (no sbatch) and installing it needs root: "
                    "run tests/launch/slurm_local.sh install start as root")
    started = subprocess.run(["bash", str(SLURM_LOCAL), "install", "start"], capture_output=True, text=True,
                             timeout=600)
    if started.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"no local Slurm cluster running and starting one needs root: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout + started.stderr
    conf = subprocess.run(["bash", str(SLURM_LOCAL), "conf"], capture_output=True, text=True, check=True).stdout.strip()
    yield {"SLURM_CONF": conf}
    if "reusing" not in started.stdout:  # leave a cluster that someone else started running
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], timeout=60)


def submit(env: dict[str, str], shards: Path, run_dir: Path) -> tuple[str, Path]:
    """Submit launch/slurm.sbatch from the checkout's root (the script finds launch/ there)."""
    out = run_dir.parent / f"{run_dir.name}-slurm.out"
    # the script asks for 8 GPUs and 32 CPUs per node; command-line options override #SBATCH lines
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
           f"--job-name={run_dir.name}", f"--output={out}", "launch/slurm.sbatch", str(train_runs.CONFIG),
           *train_runs.overrides(shards, run_dir, STEPS)]
    job_env = train_runs.launch_env(**env, NPROC="1", LOCAL_ADDR="127.0.0.1", RDZV_PORT=str(free_port()))
    result = subprocess.run(cmd, cwd=train_runs.ROOT, env=job_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0], out


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    line = subprocess.run(["scontrol", "-o", "show", "job", job], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True).stdout
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def wait_done(env: dict[str, str], job: str, out: Path) -> dict[str, str]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = job_info(env, job)
        if info["JobState"] in DONE_STATES:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env={**os.environ, **env})
    raise AssertionError(f"job {job} not done after {JOB_TIMEOUT_S} s:\n{read(out)[-4000:]}")


def wait_steps(env: dict[str, str], job: str, out: Path, run_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        if job_info(env, job)["JobState"] in DONE_STATES:
            raise AssertionError(f"job {job} ended before step {steps}:\n{read(out)[-4000:]}")
        time.sleep(0.05)
    subprocess.run(["scancel", job], env={**os.environ, **env})
    raise AssertionError(f"job {job} logged no step {steps} in {JOB_TIMEOUT_S} s:\n{read(out)[-4000:]}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else f"({path} not written)"


def test_slurm_two_nodes_usr1_checkpoints_requeues_and_resumes_exactly(slurm_env, shards, tmp_path):
    straight_dir = tmp_path / "straight"
    job, out = submit(slurm_env, shards, straight_dir)
    info = wait_done(slurm_env, job, out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), read(out)[-4000:]
    assert info["NodeList"] == "node[1-2]"
    reference = train_runs.step_losses(straight_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "requeued"
    job, out = submit(slurm_env, shards, run_dir)
    wait_steps(slurm_env, job, out, run_dir, SIGNAL_AFTER)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env={**os.environ, **slurm_env}, check=True)
    info = wait_done(slurm_env, job, out)
    log = read(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert f"requeueing job {job}" in log, log[-4000:]
    resumed = re.search(r"\[train\] resumed from (\S+) at step (\d+)", log)
    assert resumed, log[-4000:]
    stopped_at = int(resumed.group(2))
    # the checkpoint came from the signal, not from the end of the run
    assert f"stop signal received; checkpoint saved at step {stopped_at}" in log
    assert SIGNAL_AFTER <= stopped_at < STEPS
    assert (Path(resumed.group(1)) / "COMPLETE.json").is_file()
    assert train_runs.step_losses(run_dir) == reference
