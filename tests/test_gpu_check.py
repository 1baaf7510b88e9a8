"""bench/gpu_check.py on a machine without CUDA: it imports, refuses with one clear line and exit
code 3, and its whole code path (checks, engine throughput, the RESULTS table) runs with
``--cpu-dry-run`` at toy shapes, so the GPU session finds a script that works up to CUDA itself."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_cleanly_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_script().main([]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gpu_check: no CUDA device") and len(captured.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(capsys):
    assert load_script().main(["--cpu-dry-run"]) == 0
    out = capsys.readouterr().out
    for check in ("A- sdpa bf16", "M- torch fp32", "T- fp32", "M-A-T- state passing fp32"):
        assert f"| {check} |" in out
    assert out.count("| ok |") == 8 and "FAIL" not in out
    assert "| debug.yaml | M-A- |" in out
