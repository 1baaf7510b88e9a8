"""Tensor x pipeline parallelism: 4 gloo ranks at ``parallel.tensor_parallel=2
parallel.pipeline_parallel=2`` train like one process, and their export is the one-process model.

Tolerance (fp32): rel 1e-5 / abs 1e-6 on losses and gradient norms, rtol 1e-4 / atol 1e-5 on the
exported weights, those of the TP and PP tests (tests/train/test_tensor_parallel_training.py,
test_pipeline.py): a row-parallel projection sums two half-width matmuls in an all-reduce and the
tied embedding's gradient is summed between the stages, each another order of the same fp32
additions (~1e-7 relative per step), which Adam's m / sqrt(v) can amplify for near-zero gradient
entries, not to 1e-5 in three steps.
"""
import json
from pathlib import Path

import pytest
import torch

import synthetic

pytestmark = pytest.mark.distributed

#: attention + MLP twice, tied head: 4 query/KV heads and the MLP split over 2 ranks, one pair per stage
MODEL = {"vocab_size": 64, "d_model": 32, "layer_pattern": "A-|A-", "attention": {"n_heads": 2},
         "mlp": {"hidden_size": 32}}


def _job(run_dir, tp, pp):
    parallel = {"tensor_parallel": tp, "pipeline_parallel": pp}
    if pp > 1:
        parallel["pipeline_micro_batches"] = 2
    job = synthetic.job_dict(run_dir, steps=3, gas=1 if pp > 1 else 2, parallel=parallel,
                             eval={"every": 0, "hooks": ["val_loss"], "max_batches": 1})
    job["model"] = dict(MODEL, layer_pattern=MODEL["layer_pattern"] if pp > 1 else "A-A-")
    return job


def _worker(rank, world_size, root, tp, pp):
    from hybrid_lm.train.checkpoint import load_model_state
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    run_dir = Path(root) / f"tp{tp}-pp{pp}"
    result = train(job_config_from_dict(_job(run_dir, tp, pp)), make_loader=synthetic.factory())
    if rank != 0:
        return {"losses": result.losses}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_model_state(result.checkpoint).state_dict
    return {"losses": result.losses, "evals": result.evals, "checkpoint": str(result.checkpoint),
            "norms": [r["train/grad_norm"] for r in rows if "train/grad_norm" in r],
            "tokens": [r["train/tokens"] for r in rows if "train/tokens" in r],
            "weights": {k: v.numpy() for k, v in weights.items()}}


def test_two_tensor_by_two_pipeline_ranks_train_like_one_process(tmp_path):
    from distributed_utils import run_distributed

    four = run_distributed(_worker, 4, args=(str(tmp_path), 2, 2), timeout_s=600)
    (one,) = run_distributed(_worker, 1, args=(str(tmp_path), 1, 1), timeout_s=600)
    got = four[0]
    assert sorted(one["losses"]) == sorted(got["losses"]) == [0, 1, 2]
    assert all(r["losses"] == got["losses"] for r in four)  # every rank logs the same global loss
    for step, loss in one["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert got["tokens"] == one["tokens"] == [128, 256, 384]  # each pipeline's loss counted once
    assert got["norms"] == pytest.approx(one["norms"], rel=1e-5) and one["norms"][0] > 1.0  # clipping acts
    assert got["evals"][3]["val_loss"] == pytest.approx(one["evals"][3]["val_loss"], rel=1e-5)
    marker = json.loads((Path(got["checkpoint"]) / "COMPLETE.json").read_text())
    assert marker["layout"] == {"pipeline_parallel": 2, "pipeline_stages": "A-|A-", "tensor_parallel": 2}
    # export: every (stage, TP rank)'s layer files re-assembled into the one-process model
    assert got["weights"].keys() == one["weights"].keys()
    for name, value in one["weights"].items():
        torch.testing.assert_close(torch.from_numpy(got["weights"][name]), torch.from_numpy(value),
                                   rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
