"""lm-evaluation-harness runs on an export, offline, with a local task (``lm_eval_task/``).

This is the documented way to evaluate exports (export/README.md). Each architecture kind is run
once: a native class (Llama) and a remote-code one (``trust_remote_code=True``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from export_helpers import save_tiny

from hybrid_lm.export.api import export_checkpoint

pytest.importorskip("lm_eval", reason="lm-eval is the 'eval' extra: pip install -e '.[eval]'")
TASK_DIR = Path(__file__).parent / "lm_eval_task"


@pytest.mark.parametrize("case", ["llama", "remote_window"])
def test_lm_eval_smoke(tmp_path, case):
    src, _ = save_tiny(tmp_path, case)
    out = export_checkpoint(src, tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={out},trust_remote_code=True,dtype=float32",
           "--tasks", "hybrid_lm_smoke", "--include_path", ".", "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list((tmp_path / "results").rglob("results_*.json"))
    assert files, proc.stdout[-2000:]
    metrics = json.loads(files[0].read_text())["results"]["hybrid_lm_smoke"]
    assert 0.0 <= metrics["acc,none"] <= 1.0
    # a random byte model: perplexity of the continuations is finite and far from perfect
    assert 1.0 < metrics["perplexity,none"] < float("inf")
