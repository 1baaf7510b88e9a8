"""Context parallelism with data parallelism and across a resume, through ``train()`` on 4 gloo
ranks (one spawn shared by every case):

- DP=2 x CP=2 follows plain data parallelism over 4 ranks with one row each for 3 steps (losses,
  gradient norms, tokens). The synthetic loader shards by global sample index: DP rank r of 2 with
  2 rows reads samples 4n+2r, 4n+2r+1 at step n, the 4 x 1-row reference reads 4n..4n+3, which is
  also what one process reads over 2 micro-batches of 2 rows. With no ignored labels the mean of
  the rows' means is the batch mean. The reference runs first: DeepSpeed keeps the first engine's
  mpu process-wide.
- ZeRO-1 (``A-``) and ZeRO-2 (``M-A-``): the optimizer state is partitioned over data x context.
- A DP=2 x CP=2 run stopped at step 2 (``train.stop_at``) and resumed to step 3 equals the straight
  run bitwise (the step-3 loss and the saved weights), as every same-layout resume of the trainer.
- The step-2 checkpoint resumed at CP=4 x DP=1 with 2 micro-batches (another context-parallel size:
  the weights are replicated over CP, so only the data layout changes; checkpoint/reshard.py
  carries the weights and AdamW moments, the loader's cursors are remapped from 2 data ranks to 1)
  gives the straight run's step-3 loss (rel 1e-5: another reduction order).

- TP=2 x CP=2 (``A-``; megatron's order tp-cp-dp: the CP forward sees the TP plan's heads, the
  slice's loss comes from the vocabulary-sharded logits) follows TP=2 x DP=2 with one row each,
  with the all-gather (contiguous, ZeRO-0) and Ulysses (zig-zag, ZeRO-1: 2 heads per TP rank).

Rows hold three documents as in test_context_parallel_training.py; fp32, tiny widths.
"""
import json
from pathlib import Path

import pytest
import torch

from test_context_parallel_training import _metric, _with_documents

pytestmark = pytest.mark.distributed


def _job(run_dir, cp, pattern, *, zero=0, gas=1, micro=2, tp=1, layout="contiguous", scheme="allgather", **train):
    import synthetic

    job = synthetic.job_dict(run_dir, steps=3, zero_stage=zero, gas=gas, train=train,
                             parallel={"context_parallel": cp, "tensor_parallel": tp,
                                       "context_parallel_layout": layout, "context_parallel_attention": scheme})
    job["data"]["micro_batch_size"] = micro
    job["model"] = {"vocab_size": 64, "d_model": 32, "layer_pattern": pattern, "attention": {"n_heads": 4, "n_kv_heads": 2},
                    "mlp": {"hidden_size": 48}, "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8}}
    return job


def _factory(batch_size):
    """test_context_parallel_training's rows of three documents, with the synthetic loader's cursor
    remap (a resume at another data-parallel size)."""
    import synthetic

    base = synthetic.factory(batch_size=batch_size)

    def make(split, rank, world):
        inner = base(split, rank, world)
        loader = _with_documents(inner)
        loader.remap_state_dicts = inner.remap_state_dicts
        return loader

    return make


def _worker(rank, world_size, root):
    from hybrid_lm.train.checkpoint import layout, load_model_state
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train
    from hybrid_lm.train.process_groups import destroy_process_groups

    def run(name, cp, pattern, **kw):
        run_dir = Path(root) / name
        job = _job(run_dir, cp, pattern, **kw)
        result = train(job_config_from_dict(job), make_loader=_factory(job["data"]["micro_batch_size"]))
        marker = json.loads((Path(result.checkpoint) / "COMPLETE.json").read_text())
        weights = load_model_state(result.checkpoint).state_dict if rank == 0 else {}
        return {"losses": result.losses, "layout": marker.get("layout"), "checkpoint": str(result.checkpoint),
                "weights": {k: v.numpy() for k, v in weights.items()},
                "norms": _metric(run_dir, "train/grad_norm") if rank == 0 else None,
                "tokens": _metric(run_dir, "train/tokens") if rank == 0 else None}

    out = {"ref": {p: run(f"ref-{p}", 1, p, micro=1) for p in ("A-", "M-A-")}}
    out["dpcp"] = {p: run(f"dpcp-{p}", 2, p, zero=2 if p == "M-A-" else 1) for p in ("A-", "M-A-")}
    # ZeRO-1: the optimizer is partitioned over data x context, which the CP-size change re-cuts
    stopped = run("resume-A-", 2, "A-", zero=1, stop_at=2)
    out["stopped"] = stopped
    step2 = str(Path(stopped["checkpoint"]).parent / layout.step_dir_name(2))
    out["resumed"] = run("resume-A-", 2, "A-", zero=1)
    destroy_process_groups()  # megatron's groups are per degrees
    out["cp4"] = run("cp4-A-", 4, "A-", zero=1, gas=2, resume=step2)
    destroy_process_groups()
    # TP=2 x CP=2 (DP 1, 2 rows) against TP=2 x DP=2 with one row each: the same samples 2n, 2n+1
    out["tp"] = run("tp-A-", 1, "A-", tp=2, micro=1)
    destroy_process_groups()
    out["tpcp"] = run("tpcp-A-", 2, "A-", tp=2)
    out["tpcp-ulysses"] = run("tpcp-ulysses-A-", 2, "A-", tp=2, zero=1, layout="zigzag", scheme="ulysses")
    return out


def test_data_x_context_parallel_and_resume(tmp_path):
    from distributed_utils import run_distributed

    outs = run_distributed(_worker, 4, args=(str(tmp_path),), timeout_s=600)
    first = outs[0]
    for pattern, ref in first["ref"].items():
        got = first["dpcp"][pattern]
        assert sorted(ref["losses"]) == [0, 1, 2]
        assert all(o["dpcp"][pattern]["losses"] == got["losses"] for o in outs), pattern  # one global loss
        for step, loss in ref["losses"].items():
            assert got["losses"][step] == pytest.approx(loss, rel=1e-5), (pattern, step)
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5), pattern
        assert got["tokens"] == ref["tokens"] == [128, 256, 384], pattern  # 4 rows of 32 per step, counted once
        assert got["layout"] == {"context_parallel": 2}, pattern
        for name, value in ref["weights"].items():
            torch.testing.assert_close(torch.from_numpy(got["weights"][name]), torch.from_numpy(value),
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"{pattern} {name}: {m}")

    straight = first["dpcp"]["A-"]
    assert sorted(first["stopped"]["losses"]) == [0, 1]
    assert first["stopped"]["losses"] == {s: straight["losses"][s] for s in (0, 1)}
    assert first["resumed"]["losses"] == {2: straight["losses"][2]}  # bitwise
    assert first["resumed"]["weights"].keys() == straight["weights"].keys()
    for name, value in straight["weights"].items():
        assert (first["resumed"]["weights"][name] == value).all(), name

    cp4 = first["cp4"]
    assert sorted(cp4["losses"]) == [2] and cp4["layout"] == {"context_parallel": 4}
    assert cp4["losses"][2] == pytest.approx(straight["losses"][2], rel=1e-5)
    assert cp4["tokens"] == [384]
    for name, value in straight["weights"].items():
        torch.testing.assert_close(torch.from_numpy(cp4["weights"][name]), torch.from_numpy(value),
                                   rtol=1e-4, atol=1e-5, msg=lambda m: f"cp4 {name}: {m}")

    ref = first["tp"]
    assert sorted(ref["losses"]) == [0, 1, 2]
    for case in ("tpcp", "tpcp-ulysses"):  # allgather contiguous ZeRO-0, Ulysses zig-zag ZeRO-1
        got = first[case]
        assert got["layout"] == {"context_parallel": 2, "tensor_parallel": 2}, case
        assert all(o[case]["losses"] == got["losses"] for o in outs), case
        for step, loss in ref["losses"].items():
            assert got["losses"][step] == pytest.approx(loss, rel=1e-5), (case, step)
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5), case
        assert got["tokens"] == ref["tokens"] == [64, 128, 192], case
        for name, value in ref["weights"].items():
            torch.testing.assert_close(torch.from_numpy(got["weights"][name]), torch.from_numpy(value),
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"{case} {name}: {m}")
