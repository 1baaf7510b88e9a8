"""``hybrid-lm export`` says which training step it exported, in its summary line and in
``hybrid_lm_export.json``; a model-only dir has no step and says none."""
import json
import sys
from pathlib import Path

import pytest
from export_helpers import save_tiny

from hybrid_lm.cli import main as cli_main

pytest.importorskip("hybrid_lm.train.checkpoint", reason="the training engine (hybrid_lm.train.checkpoint) is missing")

TRAIN_TESTS = Path(__file__).resolve().parents[1] / "train"
if str(TRAIN_TESTS) not in sys.path:
    sys.path.insert(0, str(TRAIN_TESTS))

import synthetic  # noqa: E402  (the engine tests' in-memory loader)


def test_summary_and_metadata_name_the_exported_step(tmp_path, capsys):
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    run = tmp_path / "run"
    train(job_config_from_dict(synthetic.job_dict(run, steps=4, checkpoint={"every": 2, "keep": 2})),
          make_loader=synthetic.factory())
    for source, step in ((run, 4), (run / "checkpoints" / "step-0000002", 2)):
        out = tmp_path / f"hf-{step}"
        capsys.readouterr()
        assert cli_main(["export", str(source), str(out)]) == 0
        assert capsys.readouterr().out.strip().startswith(f"exported {source} (step {step}) -> {out} as ")
        assert json.loads((out / "hybrid_lm_export.json").read_text())["step"] == step


def test_model_dir_export_has_no_step(tmp_path, capsys):
    src, _ = save_tiny(tmp_path, "llama")
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().startswith(f"exported {src} (model-only dir, no training step) -> ")
    assert json.loads((tmp_path / "out" / "hybrid_lm_export.json").read_text())["step"] is None
