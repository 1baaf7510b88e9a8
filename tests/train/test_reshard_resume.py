"""Resume on another parallel layout (train/checkpoint/reshard.py): one run of 5 steps continued
across layouts, each segment's losses those of the uninterrupted run.

    DP=2 (steps 1)  ->  TP=2 (step 2)  ->  PP=2 (step 3)      2 gloo ranks
    TP=2 checkpoint ->  1 process (steps 3-5)                  TP2 -> TP1, data parallel 1
    PP=2 checkpoint ->  1 process (steps 4-5)                  PP2 -> PP1

so TP1 -> TP2 (with DP 2 -> 1), TP2 -> PP2, TP2 -> TP1 and PP2 -> PP1 are each crossed once, with
weights, AdamW moments and step counts, trainer counters and the loader cursors (remapped by
SyntheticLoader when the data-parallel size changes) carried over. Every layout sees the same 4
sequences per step. Tolerance: rel 1e-5 / abs 1e-6, the layout parity tests' (fp32: another
layout adds the same numbers in another order, ~1e-7 relative per step; the weights and moments
themselves are moved exactly).
"""
import json
from pathlib import Path

import pytest

import synthetic

pytestmark = pytest.mark.distributed

MODEL = {"vocab_size": 64, "d_model": 32, "attention": {"n_heads": 2}, "mlp": {"hidden_size": 32}}
LAYOUTS = {  # name: (parallel section, gradient accumulation)
    "dp2": ({}, 1),
    "tp2": ({"tensor_parallel": 2}, 2),
    "pp2": ({"pipeline_parallel": 2, "pipeline_micro_batches": 2}, 1),
    "one": ({}, 2),
}


def _run(root, name, layout, **train_extra):
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    parallel, gas = LAYOUTS[layout]
    job = synthetic.job_dict(Path(root) / name, steps=5, gas=gas, parallel=dict(parallel), train=train_extra)
    job["model"] = dict(MODEL, layer_pattern="A-|A-" if layout == "pp2" else "A-A-")
    return train(job_config_from_dict(job), make_loader=synthetic.factory())


def _two_ranks(rank, world_size, root):
    # data parallel first: DeepSpeed keeps the first engine's mpu process-wide (train/README.md)
    straight = _run(root, "straight", "dp2")
    a = _run(root, "a", "dp2", stop_at=1)
    b = _run(root, "b", "tp2", resume=str(a.checkpoint), stop_at=2)
    c = _run(root, "c", "pp2", resume=str(b.checkpoint), stop_at=3)
    return {"straight": straight.losses, "a": a.losses, "b": b.losses, "c": c.losses,
            "tokens": c.state.tokens, "b_ckpt": str(b.checkpoint), "c_ckpt": str(c.checkpoint)}


def _one_rank(rank, world_size, root, tp_ckpt, pp_ckpt):
    d = _run(root, "d", "one", resume=tp_ckpt)
    e = _run(root, "e", "one", resume=pp_ckpt)
    return {"d": d.losses, "e": e.losses, "tokens": e.state.tokens}


def test_resume_follows_the_run_across_tensor_pipeline_and_data_parallel_layouts(tmp_path):
    from distributed_utils import run_distributed

    two = run_distributed(_two_ranks, 2, args=(str(tmp_path),), timeout_s=600)[0]
    (one,) = run_distributed(_one_rank, 1, args=(str(tmp_path), two["b_ckpt"], two["c_ckpt"]), timeout_s=600)
    ref = two["straight"]
    assert sorted(ref) == [0, 1, 2, 3, 4] and ref[4] < ref[0]
    segments = {"a": [0], "b": [1], "c": [2], "d": [2, 3, 4], "e": [3, 4]}
    for name, steps in segments.items():
        losses = two.get(name) or one[name]
        assert sorted(losses) == steps, name
        for step in steps:
            assert losses[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (name, step)
    assert two["tokens"] == 3 * 128 and one["tokens"] == 5 * 128  # the counters carried over
    marker = json.loads((Path(two["c_ckpt"]) / "COMPLETE.json").read_text())
    assert marker["layout"] == {"pipeline_parallel": 2, "pipeline_stages": "A-|A-"}
