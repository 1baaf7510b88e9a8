"""The real trainer under the launchers: ``hybrid-lm train`` as two "nodes" on loopback through
launch/multinode.sh, and ``hybrid-lm train --nproc-per-node 2``, give the same losses as plain
``torchrun --nproc_per_node 2`` on one node.

Both layouts have world size 2 with the same global ranks, so every rank reads the same batches
and the gloo all-reduces add the same two numbers: the losses must be bitwise equal, not close.
(One process with gradient_accumulation=2 is no reference here: the loader splits the token
stream by rank, so a single rank reads other batches.)
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train_runs
from distributed_utils import free_port, run_torchrun

LAUNCH = train_runs.ROOT / "launch"
STEPS = 6

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def one_node_two_procs(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain ``torchrun --nproc_per_node 2 -m hybrid_lm.cli train``: the reference run."""
    run_dir = tmp_path_factory.mktemp("one-node") / "run"
    result = run_torchrun(["-m", "hybrid_lm.cli", "train", str(train_runs.CONFIG),
                           *train_runs.overrides(shards, run_dir, STEPS)], nproc=2, env=train_runs.launch_env(),
                          timeout_s=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_multinode_trainer_two_nodes_match_one_node(shards, one_node_two_procs, tmp_path):
    run_dir = tmp_path / "run"
    env = train_runs.launch_env(NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                                LOCAL_ADDR="127.0.0.1", RDZV_ID=tmp_path.name, MAX_RESTARTS="0")
    argv = ["bash", str(LAUNCH / "multinode.sh"), str(train_runs.CONFIG), *train_runs.overrides(shards, run_dir, STEPS)]
    # each node in its own session with its output in a file: a timeout kills the agent and its
    # workers alike and still shows what both nodes printed
    logs = [(tmp_path / f"node{node}.log").open("w") for node in (0, 1)]
    nodes = [subprocess.Popen(argv, env=dict(env, NODE_RANK=str(node)), cwd=tmp_path, stdout=logs[node],
                              stderr=subprocess.STDOUT, start_new_session=True) for node in (0, 1)]
    timed_out = False
    try:
        for node in nodes:
            node.wait(timeout=180)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert not timed_out and [node.returncode for node in nodes] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    two_nodes, reference = train_runs.step_logs(run_dir), train_runs.step_logs(one_node_two_procs)
    assert sorted(two_nodes) == list(range(1, STEPS + 1))
    assert [two_nodes[s]["train/tokens"] for s in two_nodes] == [
        s * 2 * train_runs.TOKENS_PER_RANK_STEP for s in range(1, STEPS + 1)]
    assert {s: r["train/loss"] for s, r in two_nodes.items()} == train_runs.step_losses(one_node_two_procs)
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in ckpt.glob("rank-*.json")) == ["rank-00000.json", "rank-00001.json"]


def run_cli(shards: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "hybrid_lm.cli", "train", str(train_runs.CONFIG), "--nproc-per-node", "2",
            *train_runs.overrides(shards, run_dir, STEPS), *extra]
    return subprocess.run(argv, cwd=run_dir.parent, env=train_runs.launch_env(), capture_output=True, text=True,
                          timeout=180)


def test_cli_nproc_per_node_runs_two_workers(shards, one_node_two_procs, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(shards, run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = train_runs.step_logs(run_dir)
    assert [logs[s]["train/tokens"] for s in sorted(logs)] == [
        s * 2 * train_runs.TOKENS_PER_RANK_STEP for s in range(1, STEPS + 1)]
    assert train_runs.step_losses(run_dir) == train_runs.step_losses(one_node_two_procs)
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in ckpt.glob("rank-*.json")) == ["rank-00000.json", "rank-00001.json"]


def test_cli_nproc_per_node_exits_with_the_workers_code(shards, tmp_path):
    # a diverged run exits 3 with one line, under --nproc-per-node as in a single process
    result = run_cli(shards, tmp_path / "run", "train.debug_nan_steps=[1]", "train.max_consecutive_nan=1")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "1 consecutive non-finite losses" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
