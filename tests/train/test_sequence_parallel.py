"""Sequence parallelism (``parallel.sequence_parallel``, train/sequence_parallel.py).

The 2-rank checks run inside the spawns of the tensor-parallel tests (their start-up, megatron-core
and DeepSpeed imports, dominates; a spawn of our own would cost more than all our checks):

* ``sequence_parallel_cases`` (in tests/train/test_tensor_parallel.py's spawn, checked by its
  ``test_tp2_sequence_parallel_*``): per pattern, a TP=2 + SP model, the training loss taken from the
  vocabulary-sharded logits as the engine does, gives the loss, the gathered logits and every
  gradient of one unsplit model; the activations between blocks are (B, T/2, D) on each rank; a
  length that does not split runs as plain TP; activation checkpointing on top stays exact; and
  for M-A- the collectives of a training forward + backward are counted: all-gathers and
  reduce-scatters only, no all-reduce inside a layer.
* ``sequence_parallel_run`` (in tests/train/test_tensor_parallel_training.py's spawn): 4 steps of
  ``train()`` with SP follow the TP=2 run without SP at ZeRO-0 and ZeRO-2 (losses, gradient norms,
  val_loss).

The config refusals run here, in this process.

Tolerance: fp32, rtol 1e-5 on loss and logits and on each gradient relative to its tensor's largest
entry, as tests/train/test_tensor_parallel.py: the reduce-scatters of the output projections and of
the layers' input gradients, and the norm weights' gradients summed over the two sequence halves,
add the same fp32 terms in another order (measured: every gradient within 8e-7 of its largest entry).
"""
from __future__ import annotations

import copy
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from hybrid_lm.cli import main as cli_main

V, D, B, T = 64, 32, 2, 16
TITANS = dict(n_heads=2, chunk_size=4, segment_len=8, window=8, n_persistent=2, memory_expansion=2)
CASES = {
    # Mamba-2 (one group per rank), attention, MLPs: every output projection reduce-scattered
    "M-A-": dict(layer_pattern="M-A-", attention=dict(n_heads=2),
                 mamba2=dict(d_state=8, headdim=8, ngroups=2, chunk_size=8)),
    # Titans memory (its out_proj reduce-scattered) next to attention
    "T-A-": dict(layer_pattern="T-A-", titans=TITANS, attention=dict(n_heads=2)),
    # MAC reads its input only by segments and ends in replicated work: input gradient kept whole
    # and sliced, output split after its all-reduces; MAG/MAL: both paths at once
    "C-": dict(layer_pattern="C-", titans=TITANS),
    "G-L-": dict(layer_pattern="G-L-", titans=TITANS),
    "X-": dict(layer_pattern="X-", titans=TITANS,
               atlas=dict(omega_window=2, poly_degree=2, poly_form="monomial", optimizer="momentum")),
}
RTOL, ATOL = 1e-5, 1e-6


def _np(*tensors: torch.Tensor) -> tuple:
    return tuple(t.detach().numpy().copy() for t in tensors)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(ATOL))


@contextmanager
def _counting(calls: dict[str, int]) -> Iterator[None]:
    """Count the calls of the collectives the TP/SP mappings and the loss use."""
    import torch.distributed as dist

    saved = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "reduce_scatter")}

    def counted(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call

    for name, fn in saved.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _compare(groups, kwargs: dict, checkpointing: bool = False) -> dict:
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.train.activation_checkpointing import apply_activation_checkpointing
    from hybrid_lm.train.sequence_parallel import apply_sequence_parallel
    from hybrid_lm.train.tensor_parallel import VocabParallelLoss, apply_tensor_parallel, full_tensors
    from hybrid_lm.typed_config import from_dict

    torch.manual_seed(0)
    full = HybridLM(from_dict(ModelConfig, dict(vocab_size=V, d_model=D, **kwargs)))
    split = apply_tensor_parallel(copy.deepcopy(full), groups)
    sp = apply_sequence_parallel(split, groups)
    if checkpointing:  # recomputed in backward, after the forward call returned: still split
        apply_activation_checkpointing(split, "full")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[1, -3:] = -100  # ignored labels, as packing makes them
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 6:] = 1  # a boundary inside rank 0's half: every layer needs the full doc_ids
    shapes: list[tuple] = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out[0].shape))) for b in split.blocks]
    ref = full(ids, labels=labels, doc_ids=doc_ids)
    calls: dict[str, int] = {}
    with _counting(calls):
        got = VocabParallelLoss(split)(split, ids, labels=labels, doc_ids=doc_ids)
        for h in hooks:
            h.remove()
        got.backward()
    ref.loss.backward()
    out: dict = {"loss": _np(ref.loss, got), "shapes": shapes[:len(split.blocks)], "active": sp.active,
                 "calls": calls}
    grads = full_tensors(split, groups, grads=True)
    out["grads"] = {n: _np(p.grad, grads[n]) for n, p in full.named_parameters() if p.grad is not None}
    out["no_grad"] = sorted(n for n, p in full.named_parameters() if p.grad is None or n not in grads)
    with torch.no_grad():  # gathered logits (evaluation), then a length that does not split (plain TP)
        out["logits"] = _np(full(ids, doc_ids=doc_ids).logits, split(ids, doc_ids=doc_ids).logits)
        out["odd"] = _np(full(ids[:, :T - 1]).logits, split(ids[:, :T - 1]).logits)
        out["odd_active"] = sp.active
    return out


def sequence_parallel_cases(groups) -> dict:
    """Run in a 2-rank TP spawn: every case of ``CASES``, and M-A- under activation checkpointing."""
    results: dict = {}
    for name, (kwargs, checkpointing) in {**{p: (kw, False) for p, kw in CASES.items()},
                                          "M-A- checkpointed": (CASES["M-A-"], True)}.items():
        try:
            results[name] = _compare(groups, kwargs, checkpointing)
        except Exception:  # noqa: BLE001 - reported per case by the test
            results[name] = {"error": traceback.format_exc()}
    return results


CASE_NAMES = [*CASES, "M-A- checkpointed"]


def check_sequence_parallel_case(results_by_rank: list[dict], name: str) -> None:
    """The assertions on one ``sequence_parallel_cases`` entry, for every rank."""
    blocks = len(CASES[name.split()[0]]["layer_pattern"])
    for rank, results in enumerate(results_by_rank):
        res = results[name]
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        assert res["active"] and not res["odd_active"]
        # the residual stream between blocks holds this rank's half of the sequence only
        assert res["shapes"] == [(B, T // 2, D)] * blocks, (rank, res["shapes"])
        assert res["no_grad"] == [], f"rank {rank}: parameters without a gradient: {res['no_grad']}"
        for key in ("loss", "logits", "odd"):
            ref, got = map(torch.from_numpy, res[key])
            torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"rank {rank} {key}: {m}")
        for pname, pair in res["grads"].items():
            ref, got = map(torch.from_numpy, pair)
            assert _max_rel(got, ref) < RTOL, f"rank {rank} grad {pname}: max rel diff {_max_rel(got, ref):.2e}"
        if name == "M-A-":
            # per block: forward all-gather at the layer's entry and reduce-scatter of its output,
            # backward the reverse; embedding reduce-scatter and head all-gather, and back; no
            # all-reduce in any layer: only the loss's three and the 5 norm weights' gradients
            assert res["calls"] == {"all_gather": 10, "reduce_scatter": 10, "all_reduce": 3 + 5}, (rank, res["calls"])


def sequence_parallel_run(job: dict, rank: int) -> dict:
    """Run in a 2-rank spawn: ``train()`` of ``job`` (a TP=2 job) with ``parallel.sequence_parallel``
    on; its losses and logged gradient norms, and whether the engine's model was split (and was at
    its last call)."""
    import json

    import hybrid_lm.train.sequence_parallel as sequence_parallel
    import synthetic
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    applied = []
    apply = sequence_parallel.apply_sequence_parallel
    sequence_parallel.apply_sequence_parallel = lambda *a: applied.append(apply(*a)) or applied[-1]
    try:
        job = {**job, "parallel": {**job["parallel"], "sequence_parallel": True}}
        result = train(job_config_from_dict(job), make_loader=synthetic.factory())
    finally:
        sequence_parallel.apply_sequence_parallel = apply
    norms = None
    if rank == 0:  # rank 0 writes the metrics
        lines = (Path(job["train"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        norms = [json.loads(line)["train/grad_norm"] for line in lines if "train/grad_norm" in line]
    return {"losses": result.losses, "evals": result.evals, "norms": norms,
            "split": len(applied) == 1 and applied[0].active}


def check_sequence_parallel_run(got: dict, plain: dict) -> None:
    """``sequence_parallel_run``'s result against the same job's TP=2 run without SP (rank 0)."""
    assert got["split"], "train() did not apply sequence parallelism"
    assert sorted(got["losses"]) == sorted(plain["losses"])
    for step, loss in plain["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert got["norms"] == pytest.approx(plain["norms"], rel=1e-5)
    last = max(plain["evals"])
    assert got["evals"][last]["val_loss"] == pytest.approx(plain["evals"][last]["val_loss"], rel=1e-5)


DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
TP2 = ["parallel.tensor_parallel=2", "model.mamba2.ngroups=2"]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.sequence_parallel=true"],
     "parallel.sequence_parallel: needs parallel.tensor_parallel > 1 (the sequence is split over the "
     "tensor-parallel group), got tensor_parallel=1"),
    (TP2 + ["parallel.sequence_parallel=true", "data.seq_len=63"],
     "data.seq_len: 63 is not divisible by parallel.tensor_parallel=2, which parallel.sequence_parallel needs"),
    (TP2 + ["parallel.sequence_parallel=true", "parallel.pipeline_parallel=2"],
     "parallel.sequence_parallel: not supported with parallel.pipeline_parallel=2 yet"),
])
def test_sequence_parallel_refusals_at_config_load(overrides, message, capsys):
    assert cli_main(["train", str(DEBUG), *overrides, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_sequence_parallel_accepted_at_config_load(capsys):
    assert cli_main(["train", str(DEBUG), *TP2, "parallel.sequence_parallel=true", "--print-config"]) == 0
    assert '"sequence_parallel": true' in capsys.readouterr().out
