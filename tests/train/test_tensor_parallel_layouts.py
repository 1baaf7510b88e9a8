"""Tensor parallelism through the real engine (``loop.build_engine`` / ``train()``) on 4 gloo ranks,
DP=2 x TP=2: the training loss comes from the vocabulary-sharded logits (never the gathered ones),
and the memory families (T-A-, C-, X-) and M-A- train like one process.

Two spawns shared by every test through module fixtures (megatron-core/DeepSpeed imports dominate:
~16 s per process, the runs themselves ~1 s each): 4 ranks, and 1 rank for every reference run
(2 micro-batches per step: the global batch of the two data-parallel replicas). The memory
families train at DP=2 x TP=2 rather than in a 2-rank TP=2 spawn of their own: each replica is
exactly a TP=2 split of the model, and that spawn would add ~22 s of CPU for imports alone
(the suite's budget); their model-level TP=2 parity is tests/train/test_tensor_parallel.py's.

Tolerance: fp32, rel 1e-5 on per-step losses and gradient norms (as in
tests/train/test_tensor_parallel_training.py), and on each gradient relative to the tensor's
largest entry. Exact equality is not expected: row-parallel projections sum two half-width
matmuls in an all-reduce, the vocab-parallel cross-entropy sums exp(logits) per shard before its
all-reduce, and DeepSpeed averages the replicas' gradients where one process accumulates them:
other orders of the same fp32 additions (~1e-7 relative per step; measured: losses within
1.2e-7, gradient norms within 2.7e-7, gradients within 4.1e-7 of their largest entry). ``pytest -s``
prints the measured differences so a drift shows.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import synthetic
from distributed_utils import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

V = 64
TITANS = {"n_heads": 2, "chunk_size": 4, "segment_len": 8, "window": 8, "n_persistent": 2, "memory_expansion": 2}
#: tiny models (d_model 32) of the families whose TP plans only model-level tests covered so far
FAMILIES = {
    "T-A-": {"layer_pattern": "T-A-", "titans": TITANS, "attention": {"n_heads": 2}},
    "C-": {"layer_pattern": "C-", "titans": TITANS},
    "X-": {"layer_pattern": "X-", "titans": TITANS,
           "atlas": {"omega_window": 2, "poly_degree": 2, "poly_form": "monomial", "optimizer": "momentum"}},
}
#: Mamba-2 with 2 groups (one per TP rank) and attention, for DP=2 x TP=2
MAMBA = {"layer_pattern": "M-A-", "attention": {"n_heads": 2}, "mlp": {"hidden_size": 48},
         "mamba2": {"d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8}}
STEPS = 3
RTOL = 1e-5


def _job(run_dir: Path, model: dict, *, tp: int, gas: int = 1) -> dict:
    job = synthetic.job_dict(run_dir, steps=STEPS, gas=gas, parallel={"tensor_parallel": tp})
    job["model"] = {"vocab_size": V, "d_model": 32, **model}
    return job


def _train(root: str, name: str, model: dict, *, tp: int, gas: int = 1) -> dict:
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    run_dir = Path(root) / name
    result = train(job_config_from_dict(_job(run_dir, model, tp=tp, gas=gas)), make_loader=synthetic.factory())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [result.losses[s] for s in range(STEPS)],
            "norms": [row["train/grad_norm"] for row in rows if "train/grad_norm" in row]}


def _batch(data_rank: int) -> dict:
    batch = next(iter(synthetic.SyntheticLoader("train", data_rank, 2)))
    batch["labels"][0, 5:9] = -100  # document ends: the ignored labels must stay out of the mean
    return batch


def _sharded_loss_step(root: str) -> dict:
    """One training micro-batch per data-parallel replica through ``build_engine`` at DP=2 x TP=2
    (ZeRO-0, so the DP-averaged gradients stay in ``.grad``), with the logit all-gather counted,
    against the same seeded model unsplit on both replicas' batches."""
    from hybrid_lm.train import distributed as D
    from hybrid_lm.train import tensor_parallel as tpm
    from hybrid_lm.train.build import build_model
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import build_engine
    from hybrid_lm.train.process_groups import current_groups

    cfg = job_config_from_dict(_job(Path(root) / "loss", {"layer_pattern": "A-", "attention": {"n_heads": 2}}, tp=2))
    info = D.init_distributed()
    model = build_model(cfg.model, seed=0, init_from=None, resuming=False)
    full = copy.deepcopy(model)
    engine = build_engine(model, cfg, info)
    groups = current_groups()
    batch = _batch(groups.dp_rank)

    gathers, shapes = [], []
    real_gather, real_loss = tpm._GatherLastDim, tpm.vocab_parallel_loss

    class CountingGather:
        @staticmethod
        def apply(x, group):
            gathers.append(tuple(x.shape))
            return real_gather.apply(x, group)

    def spy_loss(logits, labels):
        shapes.append(tuple(logits.shape))
        return real_loss(logits, labels)

    tpm._GatherLastDim, tpm.vocab_parallel_loss = CountingGather, spy_loss
    try:
        stats = engine.forward_backward([batch])
        in_training = list(gathers)
        with torch.no_grad():  # evaluation and generation still get the full logits
            eval_logits = engine.module(batch["input_ids"]).logits
    finally:
        tpm._GatherLastDim, tpm.vocab_parallel_loss = real_gather, real_loss
    # DeepSpeed averages the replicas' gradients: the gradient of the mean of their losses
    ref = [full(b["input_ids"], labels=b["labels"], doc_ids=b["doc_ids"], position_ids=b["position_ids"]).loss
           for b in (_batch(0), _batch(1))]
    (sum(ref) / 2).backward()
    grads = tpm.full_tensors(engine.module, groups, grads=True)
    split = engine.module
    return {
        "gathers_in_training": in_training, "gathers_in_eval": gathers[len(in_training):], "loss_shapes": shapes,
        "loss": stats.loss_sum if groups.tp_rank == 0 else None, "ref_loss": ref[groups.dp_rank].item(),
        "eval_logits": (eval_logits.numpy().copy(), full(batch["input_ids"]).logits.detach().numpy().copy()),
        "tied": split.lm_head.weight is split.embed.weight and full.lm_head.weight is full.embed.weight,
        "grads": {n: (grads[n].numpy().copy(), p.grad.numpy().copy()) for n, p in full.named_parameters()},
    }


def _four_worker(rank: int, world_size: int, root: str) -> dict:
    from hybrid_lm.train.process_groups import current_groups

    out = {"loss_step": _sharded_loss_step(root)}
    groups = current_groups()
    out["layout"] = (groups.tp_size, groups.dp_size, groups.tp_rank, groups.dp_rank)
    for pattern, model in {**FAMILIES, "M-A-": MAMBA}.items():
        out[pattern] = _train(root, f"dp2-tp2-{pattern}", model, tp=2)
    return out


def _one_worker(rank: int, world_size: int, root: str) -> dict:
    # the global batch of DP=2 (one micro-batch per replica): two micro-batches in one process
    return {pattern: _train(root, f"one-{pattern}", model, tp=1, gas=2)
            for pattern, model in {**FAMILIES, "M-A-": MAMBA}.items()}


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> list[dict]:
    return run_distributed(_four_worker, 4, args=(str(tmp_path_factory.mktemp("dp2tp2")),), timeout_s=600)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> dict:
    return run_distributed(_one_worker, 1, args=(str(tmp_path_factory.mktemp("one")),), timeout_s=600)[0]


def _max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def _rel_diffs(got: list[float], ref: list[float]) -> list[float]:
    return [abs(g - r) / abs(r) for g, r in zip(got, ref)]


def test_training_loss_comes_from_vocab_sharded_logits(four):
    """At TP=2 (x DP=2) the engine's loss and every gradient equal the unsplit model's
    F.cross_entropy (with ignored labels), while the logits all-gather never runs in the training
    step: the loss sees (B, T, V/2) logits. Evaluation calls still gather; the tied
    embedding/head stays one tensor."""
    assert [res["layout"] for res in four] == [(2, 2, 0, 0), (2, 2, 1, 0), (2, 2, 0, 1), (2, 2, 1, 1)]
    worst = 0.0
    for rank, res in enumerate(four):
        out = res["loss_step"]
        assert out["gathers_in_training"] == [], f"rank {rank}: full logits gathered in training"
        assert out["loss_shapes"] == [(2, 32, V // 2)], rank
        assert out["gathers_in_eval"] == [(2, 32, V // 2)], rank
        assert out["tied"], rank
        got, ref = map(torch.from_numpy, out["eval_logits"])
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-6)
        if out["loss"] is not None:
            assert out["loss"] == pytest.approx(out["ref_loss"], rel=RTOL), rank
            print(f"\nrank {rank}: vocab-parallel loss rel diff {abs(out['loss'] - out['ref_loss']) / out['ref_loss']:.1e}")
        for name, pair in out["grads"].items():
            diff = _max_rel(*map(torch.from_numpy, pair))
            worst = max(worst, diff)
            assert diff < RTOL, f"rank {rank} grad {name}: max rel diff {diff:.2e}"
    print(f"largest gradient rel diff {worst:.1e}")


@pytest.mark.parametrize("pattern", [*FAMILIES, "M-A-"])
def test_dp2_x_tp2_trains_like_one_process(four, one, pattern):
    """4 ranks: {0,1} and {2,3} each hold the model split in two (TP=2) and read their own data
    shard; one process sees both shards' micro-batches in one step (gradient accumulation 2).
    Same per-step losses on every rank and the same gradient norms: T/C/X (memory heads split),
    M-A- (Mamba-2 groups split)."""
    ref = one[pattern]
    for rank, res in enumerate(four):
        assert res[pattern]["losses"] == pytest.approx(ref["losses"], rel=RTOL), rank
    got = four[0][pattern]
    assert got["norms"] == pytest.approx(ref["norms"], rel=RTOL)
    assert ref["norms"][0] > 1.0, "clipping (grad_clip 1.0) should act on the first step"
    print(f"\n{pattern}: loss rel diffs {_rel_diffs(got['losses'], ref['losses'])}, "
          f"grad-norm rel diffs {_rel_diffs(got['norms'], ref['norms'])}")
