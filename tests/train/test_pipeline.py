"""Pipeline parallelism (train/pipeline.py, train/pipeline_engine.py): where the stack is cut, the
config checks, and for real on 2 gloo ranks: the losses of one process, exact resume, the CLI.

Tolerance of the parity tests (fp32, rel 1e-5 / abs 1e-6, the DP parity tests' own): two stages
add some numbers in another order than one process does. The tied embedding's gradient is the
first stage's lookup gradient plus the last stage's head gradient in one all-reduce, where one
process accumulates them inside autograd, and the clipping norm sums per-stage partial sums. Each
is a rounding of about 1e-7 relative, which a few AdamW steps can amplify but not to 1e-5.
(Measured: per-step losses were bitwise equal over these 4 steps; the final weights differed by
about 1e-8.)
"""
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import synthetic
from hybrid_lm.models.config import ModelConfig, ModelConfigError
from hybrid_lm.models.hybrid import Block, HybridLM
from hybrid_lm.train.config import load_job_config
from hybrid_lm.train.pipeline import balanced_bounds, marked_bounds, stage_bounds
from hybrid_lm.typed_config import ConfigError, from_dict

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"
TINY = {"vocab_size": 64, "d_model": 32, "attention": {"n_heads": 4}, "mlp": {"hidden_size": 48},
        "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8}}
#: tiny Titans (T, C) and Atlas (X) settings, test_tensor_parallel_layouts.py's
MEMORY = {"titans": {"n_heads": 2, "chunk_size": 4, "segment_len": 8, "window": 8, "n_persistent": 2,
                     "memory_expansion": 2},
          "atlas": {"omega_window": 2, "poly_degree": 2, "poly_form": "monomial", "optimizer": "momentum"}}


def _model(pattern, **extra):
    return from_dict(ModelConfig, {**TINY, "layer_pattern": pattern, **extra})


def _largest(costs, bounds, first, last):
    sums = [sum(costs[a:b]) for a, b in bounds]
    sums[0] += first
    sums[-1] += last
    return max(sums)


def test_balanced_bounds_minimise_the_largest_stage():
    rng = random.Random(0)
    for _ in range(60):
        n, stages = rng.randint(2, 7), rng.randint(2, 3)
        if stages > n:
            continue
        costs = [rng.choice([1.0, 2.0, 5.0, 9.0]) for _ in range(n)]
        first, last = rng.choice([0.0, 4.0]), rng.choice([0.0, 10.0])
        bounds = balanced_bounds(costs, stages, first_extra=first, last_extra=last)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(stages - 1))
        best = min(_largest(costs, list(zip((0, *cuts), (*cuts, n))), first, last)
                   for cuts in itertools.combinations(range(1, n), stages - 1))
        assert _largest(costs, bounds, first, last) == best, (costs, stages, bounds)


def test_stage_bounds_follow_the_marks_else_the_flops():
    assert marked_bounds("M-A-|M-|A-") == [(0, 4), (4, 6), (6, 8)]
    assert marked_bounds("M-A-") is None
    marked = HybridLM(_model("M-|A-M-A-"))
    assert stage_bounds(marked, 2, seq_len=32) == [(0, 2), (2, 8)]
    # four equal attention+MLP pairs: an even split while the head is cheap, the last stage
    # lighter once the head (2 * d_model * vocab FLOPs per token) outweighs a block pair
    assert stage_bounds(HybridLM(_model("A-A-A-A-")), 2, seq_len=32) == [(0, 4), (4, 8)]
    heavy = HybridLM(_model("A-A-A-A-", vocab_size=8192))
    assert stage_bounds(heavy, 2, seq_len=32) == [(0, 7), (7, 8)]


def test_the_model_ignores_stage_marks():
    torch.manual_seed(0)
    plain = HybridLM(_model("M-A-"))
    torch.manual_seed(0)
    marked = HybridLM(_model("M-|A-"))
    assert marked.config.n_blocks == 4 and marked.config.block_pattern == "M-A-"
    assert [b.letter for b in marked.blocks] == list("M-A-")
    a, b = plain.state_dict(), marked.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pattern", ["M-||A-", "|M-A-", "M-A-|", "|"])
def test_empty_stages_are_refused_naming_the_key(pattern):
    with pytest.raises(ModelConfigError, match=r"layer_pattern"):
        _model(pattern)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.pipeline_parallel=2", "parallel.zero_stage=2"],
     r"parallel\.zero_stage: 2 shards gradients, which DeepSpeed's pipeline engine cannot do "
     r"\(parallel\.pipeline_parallel=2\); use zero_stage 0 or 1"),
    (["parallel.pipeline_parallel=2", "parallel.zero_stage=3"], r"parallel\.zero_stage: 3 shards gradients"),
    (["parallel.pipeline_parallel=2", "parallel.zero_stage=1", "parallel.cpu_offload=true"],
     r"parallel\.cpu_offload: not supported with parallel\.pipeline_parallel=2"),
    (["parallel.pipeline_micro_batches=4"], r"parallel\.pipeline_micro_batches: needs parallel\.pipeline_parallel > 1"),
    (["parallel.pipeline_parallel=2", "parallel.pipeline_micro_batches=2", "parallel.gradient_accumulation=2"],
     r"parallel\.pipeline_micro_batches: both it and parallel\.gradient_accumulation"),
    (["parallel.pipeline_parallel=3", "model.layer_pattern=M-|A-"],
     r"model\.layer_pattern: 'M-\|A-' marks 2 pipeline stages with '\|', but parallel\.pipeline_parallel=3"),
    (["parallel.pipeline_parallel=8"], r"parallel\.pipeline_parallel: 8 stages need at least 8 blocks"),
    (["parallel.pipeline_parallel=0"], r"parallel\.pipeline_parallel: must be >= 1"),
])
def test_impossible_pipeline_configs_fail_at_load_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(DEBUG, overrides)


def test_cli_exits_2_on_a_pipeline_config_error(capsys):
    from hybrid_lm.cli import main

    assert main(["train", str(DEBUG), "parallel.pipeline_parallel=2", "parallel.zero_stage=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.zero_stage: 2 shards gradients" in err[0]


def test_a_pipeline_config_loads():
    cfg = load_job_config(DEBUG, ["parallel.pipeline_parallel=2", "parallel.pipeline_micro_batches=4",
                                  "model.layer_pattern=M-|A-"])
    assert cfg.parallel.micro_batches == 4 and cfg.model.block_pattern == "M-A-"


# Below: 2 gloo ranks (or 1 for the reference) in spawned processes.

def _job(run_dir, pattern, pp, *, tie=True, zero_stage=0, **sections):
    parallel = {"pipeline_parallel": pp, "pipeline_micro_batches": 2} if pp > 1 else {"gradient_accumulation": 2}
    sections["eval"] = {"every": 0, "hooks": ["val_loss"], "max_batches": 2, **sections.get("eval", {})}
    job = synthetic.job_dict(run_dir, steps=4, zero_stage=zero_stage, parallel=parallel, **sections)
    job["model"] = {**TINY, **MEMORY, "layer_pattern": pattern, "tie_embeddings": tie}
    return job


#: (pattern, tied head, ZeRO stage): the tied head is a TiedLayerSpec on both stages; "M-A-" is split
#: by FLOPs, the others where "|" says; the memory families (Titans memory T, MAC C, Atlas X) on either stage
CASES = [("M-A-", True, 0), ("A|-", False, 0), ("M-|A-", True, 1), ("T-|A-", True, 0), ("X-|C-", False, 1)]


def _train_cases(rank, world_size, root, pp):
    from hybrid_lm.train.checkpoint import load_model_state
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    out = {}
    for pattern, tie, zero in CASES:
        run_dir = Path(root) / f"{pattern}-{pp}"
        result = train(job_config_from_dict(_job(run_dir, pattern, pp, tie=tie, zero_stage=zero)),
                       make_loader=synthetic.factory())
        loaded = load_model_state(result.checkpoint) if rank == 0 else None
        out[pattern] = {"losses": result.losses, "evals": result.evals, "checkpoint": str(result.checkpoint),
                        "weights": None if loaded is None else {k: v.numpy() for k, v in loaded.state_dict.items()},
                        "config": None if loaded is None else loaded.model_config.layer_pattern,
                        "norms": [json.loads(line).get("train/grad_norm") for line in
                                  (run_dir / "metrics.jsonl").read_text().splitlines()] if rank == 0 else None}
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_stages_train_like_one_process(tmp_path):
    from distributed_utils import run_distributed

    two = run_distributed(_train_cases, 2, args=(str(tmp_path), 2), timeout_s=600)
    (one,) = run_distributed(_train_cases, 1, args=(str(tmp_path), 1), timeout_s=600)
    for pattern, _, _ in CASES:
        p0, p1, ref = two[0][pattern], two[1][pattern], one[pattern]
        assert sorted(p0["losses"]) == sorted(ref["losses"]) == [0, 1, 2, 3]
        assert p0["losses"] == p1["losses"]  # every rank logs the same global step loss
        for step, loss in ref["losses"].items():
            assert p0["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (pattern, step)
        assert p0["losses"][3] < p0["losses"][0]
        # the clipping norm counts the tied embedding once, as one process does (measured before clipping)
        norms, ref_norms = [n for n in p0["norms"] if n is not None], [n for n in ref["norms"] if n is not None]
        assert len(norms) == 4 and norms == pytest.approx(ref_norms, rel=1e-5)
        # the eval hook ran through the pipelined model, collectively, with the same result everywhere
        assert p0["evals"][4]["val_loss"] == p1["evals"][4]["val_loss"]
        assert p0["evals"][4]["val_loss"] == pytest.approx(ref["evals"][4]["val_loss"], rel=1e-5)
        # the checkpoint consolidates to the model's own names and config, weights as one process trained them
        assert p0["config"] == pattern.replace("|", "")
        assert p0["weights"].keys() == ref["weights"].keys()
        for name, value in ref["weights"].items():
            torch.testing.assert_close(torch.from_numpy(p0["weights"][name]), torch.from_numpy(value),
                                       rtol=1e-5, atol=1e-6)
    marker = json.loads((Path(two[0]["M-A-"]["checkpoint"]) / "COMPLETE.json").read_text())
    assert marker["layout"] == {"pipeline_parallel": 2, "pipeline_stages": "M-|A-"}


def _resume_worker(rank, world_size, root):
    from hybrid_lm.train.checkpoint import CheckpointError, load_model_state
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    def run(name, **sections):
        job = _job(Path(root) / name, "M-A-", 2, eval={"hooks": []}, **sections)
        return train(job_config_from_dict(job), make_loader=synthetic.factory())

    # first (DeepSpeed keeps process-wide group state that a pipeline engine leaves behind): a
    # data-parallel ZeRO-3 checkpoint over the same 2 ranks, which a pipeline run cannot reshard
    # (checkpoint/reshard.py) and must refuse to resume
    train(job_config_from_dict(_job(Path(root) / "dp", "M-A-", 1, zero_stage=3, eval={"hooks": []},
                                    train={"steps": 2})),
          make_loader=synthetic.factory())
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


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_on_the_same_pipeline_layout_is_exact(tmp_path):
    import math

    from distributed_utils import run_distributed

    out = run_distributed(_resume_worker, 2, args=(str(tmp_path),), timeout_s=600)[0]
    assert sorted(out["first"]) == [0, 1] and sorted(out["second"]) == [2, 3]
    merged = {**out["first"], **out["second"]}
    assert math.isnan(out["straight"][1]) and math.isnan(merged[1]) and out["skipped"] == 1  # step 2 skipped
    assert {k: v for k, v in merged.items() if k != 1} == {k: v for k, v in out["straight"].items() if k != 1}  # bitwise
    assert out["same"] is True
    assert out["refused"] is not None and "cannot be resharded: saved with parallel.zero_stage=3" in out["refused"] \
        and "now world_size=2, pipeline_parallel=2, pipeline_stages=M-|A-" in out["refused"], out["refused"]


@pytest.mark.distributed
@pytest.mark.slow
def test_cli_runs_two_stages_on_shards_like_one_process(tmp_path):
    from hybrid_lm.data.writer import build_shards

    data = tmp_path / "data"
    build_shards("stdlib", data, max_docs=6, shard_tokens=20_000, val_fraction=0.5, progress=False)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    common = [f"data.path={data}", "train.steps=3", "eval.every=0", "eval.max_batches=1"]

    def run(name, *extra):
        argv = [sys.executable, "-m", "hybrid_lm.cli", "train", str(DEBUG), *common, f"train.run_dir={tmp_path / name}",
                *extra]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return result, rows

    result, pipe = run("pp", "--nproc-per-node", "2", "parallel.pipeline_parallel=2")
    assert "[pipeline] 2 stages x 1 data parallel: M-|A-" in result.stdout
    _, single = run("one")
    losses = [(r["step"], r["train/loss"], r["train/tokens"]) for r in pipe if "train/loss" in r]
    reference = [(r["step"], r["train/loss"], r["train/tokens"]) for r in single if "train/loss" in r]
    assert [(s, t) for s, _, t in losses] == [(s, t) for s, _, t in reference] == [(1, 256), (2, 512), (3, 768)]
    for (_, loss, _), (_, ref, _) in zip(losses, reference):
        assert loss == pytest.approx(ref, rel=1e-5)
    evals = [r["val_loss"] for r in pipe if "val_loss" in r]
    assert len(evals) == 2 and evals == pytest.approx([r["val_loss"] for r in single if "val_loss" in r], rel=1e-5)


def _memory_worker(rank, world_size):
    import gc
    import weakref

    from hybrid_lm.train import distributed as D
    from hybrid_lm.train.activation_checkpointing import apply_activation_checkpointing
    from hybrid_lm.train.optim import OptimConfig
    from hybrid_lm.train.parallelize import ParallelConfig
    from hybrid_lm.train.pipeline_engine import PipelineEngine

    info = D.init_distributed()
    torch.manual_seed(0)
    model = HybridLM(_model("M-|A-"))
    apply_activation_checkpointing(model, "full")  # checkpointed blocks inside DeepSpeed's pipeline schedule
    other_stage = weakref.ref(model.blocks[0 if rank == 1 else 3])
    own = {id(p) for p in (model.blocks[0] if rank == 0 else model.blocks[3]).parameters()}
    engine = PipelineEngine(model, ParallelConfig(pipeline_parallel=2), OptimConfig(), micro_batch_size=2,
                            seq_len=32, grad_clip=1.0, device=info.device)
    del model
    gc.collect()
    kept = {id(p) for p in engine.module.parameters()}
    stats = engine.forward_backward([next(iter(synthetic.SyntheticLoader("train", 0, 1)))])
    loss = stats.loss_sum / stats.losses if stats.losses else None
    grads = all(p.grad is not None for p in engine.module.parameters())
    grads = grads and all(type(m).__name__ == "CheckpointedBlock" for m in engine.module.modules()
                          if isinstance(m, Block))
    return other_stage() is None, own <= kept, sum(p.numel() for p in engine.module.parameters()), loss, grads


@pytest.mark.distributed
@pytest.mark.slow
def test_a_stage_keeps_only_its_own_layers():
    from distributed_utils import run_distributed

    torch.manual_seed(0)
    plain = HybridLM(_model("M-A-"))
    full = sum(p.numel() for p in plain.parameters())
    (freed0, own0, n0, _, grads0), (freed1, own1, n1, loss, grads1) = run_distributed(_memory_worker, 2)
    assert freed0 and freed1 and own0 and own1
    # with every block checkpointed (issue 15) the pipelined step still gives the plain model's
    # loss, and every stage's parameters their gradients
    batch = next(iter(synthetic.SyntheticLoader("train", 0, 1)))
    ref = plain(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"],
                position_ids=batch["position_ids"]).loss
    assert loss == pytest.approx(float(ref), rel=1e-6) and grads0 and grads1
    assert n0 + n1 == full + 64 * 32  # the tied embedding/head lives on both stages, nothing else twice
