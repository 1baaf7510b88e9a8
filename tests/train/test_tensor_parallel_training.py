"""Tensor parallelism in the training loop (``loop.build_engine``): 2 gloo ranks at
``parallel.tensor_parallel=2`` train like one process, resume exactly, and export the full model.

Tolerance of the parity checks: fp32, rel 1e-5 / abs 1e-6 on losses, gradient norms and val_loss,
and rtol 1e-4 / atol 1e-5 on the exported weights, as tests/train/test_tensor_parallel.py states
and measured: a row-parallel projection sums two half-width matmuls in an all-reduce, another
order of the same fp32 additions (~1e-7 relative per step), which Adam's m / sqrt(v) turns into
update differences of up to a fraction of lr for near-zero gradient entries.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import synthetic

pytestmark = pytest.mark.distributed

#: M-A-: Mamba-2 (ngroups 2, so each rank holds one group), GQA-free attention, two MLPs, tied head
MODEL = {"vocab_size": 64, "d_model": 32, "layer_pattern": "M-A-", "attention": {"n_heads": 4},
         "mlp": {"hidden_size": 48}, "mamba2": {"d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8}}


def _job(run_dir, tp, zero_stage=0, **sections):
    sections["eval"] = {"every": 0, "hooks": ["val_loss"], "max_batches": 2, **sections.get("eval", {})}
    job = synthetic.job_dict(run_dir, steps=4, zero_stage=zero_stage, gas=2,
                             parallel={"tensor_parallel": tp}, **sections)
    job["model"] = dict(MODEL)
    return job


def _norms(run_dir):
    return [json.loads(line).get("train/grad_norm") for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if "train/grad_norm" in line]


def _tokens(run_dir):
    return [json.loads(line)["train/tokens"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if "train/tokens" in line]


def _parity_worker(rank, world_size, root, init_src=None):
    """ZeRO-0 and ZeRO-2, each 4 steps with 2 micro-batches, clipping on; rank 0 exports the result.
    With ``init_src``, also 2 steps starting from that one-process run's weights (``train.init_from``:
    at TP=2 loaded piece by piece into the meta-built shards)."""
    from hybrid_lm.train.checkpoint import load_model_state
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    out = {}
    for zero in (0, 2):
        run_dir = Path(root) / f"z{zero}-tp{world_size}"
        result = train(job_config_from_dict(_job(run_dir, world_size, zero)), make_loader=synthetic.factory())
        loaded = load_model_state(result.checkpoint) if rank == 0 else None
        out[zero] = {"losses": result.losses, "evals": result.evals, "checkpoint": str(result.checkpoint),
                     "weights": None if loaded is None else {k: v.numpy() for k, v in loaded.state_dict.items()},
                     "norms": _norms(run_dir) if rank == 0 else None, "tokens": _tokens(run_dir) if rank == 0 else None}
    if init_src is not None:
        job = _job(Path(root) / f"init-tp{world_size}", world_size, eval={"hooks": []},
                   train={"init_from": init_src, "steps": 2})
        out["init"] = train(job_config_from_dict(job), make_loader=synthetic.factory()).losses
    if world_size == 2:  # issue 10's sequence parallelism: the same jobs split along the sequence too
        from test_sequence_parallel import sequence_parallel_run

        out["sp"] = {zero: sequence_parallel_run(_job(Path(root) / f"z{zero}-tp2-sp", 2, zero), rank) for zero in (0, 2)}
    return out


def test_two_tensor_parallel_ranks_train_like_one_process(tmp_path):
    from distributed_utils import run_distributed

    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    src = tmp_path / "init-src"  # a trained one-process run: the weights both layouts start from
    source = train(job_config_from_dict(_job(src, 1, eval={"hooks": []})), make_loader=synthetic.factory())
    two = run_distributed(_parity_worker, 2, args=(str(tmp_path), str(src)), timeout_s=600)
    (one,) = run_distributed(_parity_worker, 1, args=(str(tmp_path), str(src)), timeout_s=600)
    # TP=2 from init_from: the loaded weights and two steps on them as one process (rel 1e-5)
    assert sorted(two[0]["init"]) == sorted(one["init"]) == [0, 1]
    for step, loss in one["init"].items():
        assert two[0]["init"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    # the loaded weights, not the seed's: the first loss is the trained source's, below a fresh start's
    assert one["init"][0] < source.losses[0] - 0.1 and one["init"][0] < one[0]["losses"][0] - 0.1
    for zero in (0, 2):
        p0, p1, ref = two[0][zero], two[1][zero], one[zero]
        assert sorted(p0["losses"]) == sorted(ref["losses"]) == [0, 1, 2, 3]
        assert p0["losses"] == p1["losses"]  # every rank logs the same global step loss
        for step, loss in ref["losses"].items():
            assert p0["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (zero, step)
        assert p0["losses"][3] < p0["losses"][0]
        # tokens counted once per data-parallel replica, not once per rank: those of one process
        assert p0["tokens"] == ref["tokens"] == [128, 256, 384, 512]
        # the norm sums the split gradients' squares over the TP group and the replicated ones once
        assert len(p0["norms"]) == 4 and p0["norms"] == pytest.approx(ref["norms"], rel=1e-5)
        assert ref["norms"][0] > 1.0, "clipping (grad_clip 1.0) should act on the first step"
        assert p0["evals"][4]["val_loss"] == p1["evals"][4]["val_loss"]
        assert p0["evals"][4]["val_loss"] == pytest.approx(ref["evals"][4]["val_loss"], rel=1e-5)
        # export gathers the shards into the one-process model's names and shapes
        assert p0["weights"].keys() == ref["weights"].keys()
        for name, value in ref["weights"].items():
            torch.testing.assert_close(torch.from_numpy(p0["weights"][name]), torch.from_numpy(value),
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"ZeRO-{zero} {name}: {m}")
    from test_sequence_parallel import check_sequence_parallel_run

    for zero in (0, 2):  # SP follows TP=2 without it
        check_sequence_parallel_run(two[0]["sp"][zero], two[0][zero])
    marker = json.loads((Path(two[0][0]["checkpoint"]) / "COMPLETE.json").read_text())
    assert marker["layout"] == {"tensor_parallel": 2}


def _resume_worker(rank, world_size, root):
    from hybrid_lm.train.checkpoint import CheckpointError, load_model_state
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    def run(name, tp=2, **sections):
        job = _job(Path(root) / name, tp, eval={"hooks": []}, **sections)
        return train(job_config_from_dict(job), make_loader=synthetic.factory())

    # first (DeepSpeed keeps the mpu of its first engine process-wide): a data-parallel ZeRO-3
    # checkpoint over the same 2 ranks, which a TP=2 run cannot reshard (checkpoint/reshard.py) and refuses
    run("dp", tp=1, zero_stage=3, train={"steps": 2})
    try:
        run("dp")
        refused = None
    except CheckpointError as exc:
        refused = str(exc)
    nan = {"debug_nan_steps": [2]}
    straight = run("a", train=nan)
    first = run("b", train={**nan, "stop_at": 2})
    second = run("b", train=nan)
    weights = [load_model_state(r.checkpoint).state_dict for r in (straight, second)] if rank == 0 else None
    same = None if weights is None else all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    return {"straight": straight.losses, "first": first.losses, "second": second.losses, "same": same,
            "refused": refused, "skipped": straight.state.nan_skipped}


def test_resume_on_the_same_tensor_parallel_layout_is_exact(tmp_path):
    from distributed_utils import run_distributed

    out = run_distributed(_resume_worker, 2, args=(str(tmp_path),), timeout_s=600)[0]
    assert sorted(out["first"]) == [0, 1] and sorted(out["second"]) == [2, 3]
    merged = {**out["first"], **out["second"]}
    assert math.isnan(out["straight"][1]) and math.isnan(merged[1]) and out["skipped"] == 1  # step 2 skipped
    assert {k: v for k, v in merged.items() if k != 1} == {k: v for k, v in out["straight"].items() if k != 1}  # bitwise
    assert out["same"] is True
    assert out["refused"] is not None and "cannot be resharded: saved with parallel.zero_stage=3" in out["refused"] \
        and "now world_size=2, tensor_parallel=2" in out["refused"], out["refused"]
