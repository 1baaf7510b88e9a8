"""Launch scripts parse, multinode.sh forms one job from two "nodes" on loopback (and restarts it
after a rank fails), and torchrun.sh runs two ranks on one node. The ranks run
tests/launch/allreduce_probe.py through the HYBRID_LM_ENTRY override. The restart tests guard
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the scripts: without it a restarted job reads the dead
ranks' addresses from the shared store and never reconnects."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_utils import free_port

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
HERE = Path(__file__).resolve().parent


def probe_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHON=sys.executable, HYBRID_LM_ENTRY="allreduce_probe", PYTHONPATH=str(HERE),
                **extra)


@pytest.mark.parametrize("script", ["torchrun.sh", "multinode.sh", "slurm.sbatch"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_scripts_refuse_missing_settings():
    result = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), "cfg.yaml"], capture_output=True, text=True,
                            env=dict(os.environ, NNODES="", NODE_RANK="", RDZV_ENDPOINT=""))
    assert result.returncode != 0 and "NNODES" in result.stderr
    usage = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "2"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def run_two_nodes(out: Path, *probe_args: str, max_restarts: int = 0) -> list[dict]:
    env = probe_env(NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", LOCAL_ADDR="127.0.0.1",
                    RDZV_ID=out.name, MAX_RESTARTS=str(max_restarts))
    procs = [subprocess.Popen(["bash", str(LAUNCH / "multinode.sh"), str(out), *probe_args],
                              env=dict(env, NODE_RANK=str(node)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    try:
        outputs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(outputs)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
def test_multinode_two_nodes_on_loopback(tmp_path):
    seen = run_two_nodes(tmp_path)
    assert [s["world"] for s in seen] == [2, 2]
    assert [s["sum"] for s in seen] == [3.0, 3.0]
    assert sorted(s["node"] for s in seen) == ["0", "1"]


@pytest.mark.distributed
def test_multinode_restarts_the_job_after_a_rank_fails(tmp_path):
    seen = run_two_nodes(tmp_path, "--fail-once", max_restarts=1)
    # Only the failed node's agent counts the restart; the healthy one re-forms on the membership
    # change and may keep its count at 0 (torchelastic's rule), so the count is checked per job.
    assert max(s["restart"] for s in seen) == 1
    assert all(s["after_failure"] for s in seen)
    assert [s["sum"] for s in seen] == [3.0, 3.0] and [s["world"] for s in seen] == [2, 2]


@pytest.mark.distributed
def test_torchrun_script_two_processes_with_a_restart(tmp_path):
    result = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "2", str(tmp_path), "--fail-once"],
                            env=probe_env(MAX_RESTARTS="1"), capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["sum"] for s in seen] == [3.0, 3.0] and [s["world"] for s in seen] == [2, 2]
    assert [s["restart"] for s in seen] == [1, 1] and all(s["after_failure"] for s in seen)
