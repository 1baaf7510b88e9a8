"""Launch scripts parse, and multinode.sh really forms one job from two "nodes" on loopback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_utils import free_port

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


@pytest.mark.parametrize("script", ["torchrun.sh", "multinode.sh", "slurm.sbatch"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_two_nodes_on_loopback(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
               HYBRID_LM_ENTRY="allreduce_probe", PYTHONPATH=str(Path(__file__).parent))
    procs = [subprocess.Popen(["bash", str(LAUNCH / "multinode.sh"), str(tmp_path)], env=dict(env, NODE_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["world"] for s in seen] == [2, 2]
    assert [s["sum"] for s in seen] == [3.0, 3.0]
    assert sorted(s["node"] for s in seen) == ["0", "1"]


def test_torchrun_script_two_processes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, HYBRID_LM_ENTRY="allreduce_probe",
               PYTHONPATH=str(Path(__file__).parent))
    result = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "2", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["sum"] for r in (0, 1)] == [3.0, 3.0]
