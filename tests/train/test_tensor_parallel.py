"""Tensor parallelism on CPU: 2 gloo ranks split every layer family by its plan and must give the
logits, loss and gradients of the unsplit model.

One spawn runs every case (megatron-core's import dominates the start-up), each rank comparing
its split model with a full copy of the same seeded model in the same process. Tolerance: fp32,
rtol 1e-5 / atol 1e-6 on logits and loss, and on gradients relative to each tensor's largest
entry. Exact equality is not expected: a row-parallel layer sums two half-width matmuls and
all-reduces them, a different order of the same fp32 additions (seen: logits within 2e-7,
gradients within 1.3e-6 of their largest entry).
"""
from __future__ import annotations

import copy
import traceback

import pytest
import torch

from distributed_utils import run_distributed

V, D, B, T = 64, 32, 2, 16
TITANS = dict(n_heads=2, chunk_size=4, segment_len=8, window=8, n_persistent=2, memory_expansion=2)
CASES = {
    "A-": dict(layer_pattern="A-", attention=dict(n_heads=4, n_kv_heads=2)),
    "M-A-": dict(layer_pattern="M-A-", attention=dict(n_heads=2),
                 mamba2=dict(d_state=8, headdim=8, ngroups=2, chunk_size=8)),
    "T-A-": dict(layer_pattern="T-A-", titans=TITANS, attention=dict(n_heads=2)),
    "C-": dict(layer_pattern="C-", titans=TITANS),
    "G-L-": dict(layer_pattern="G-L-", titans=TITANS),
    "X-": dict(layer_pattern="X-", titans=TITANS,
               atlas=dict(omega_window=2, poly_degree=2, poly_form="monomial", optimizer="momentum")),
    "D-": dict(layer_pattern="D-", titans=dict(TITANS, conv_size=0),
               atlas=dict(deep_transformer=dict(poly_degree=1))),
}
RTOL, ATOL = 1e-5, 1e-6


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 6:] = 1  # a document boundary inside row 0: the layers' resets run split too
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "doc_ids": doc_ids}


def _np(*tensors: torch.Tensor) -> tuple:
    """numpy copies: tensors sent back through the queue would go by shared memory of a dying process."""
    return tuple(t.detach().numpy().copy() for t in tensors)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(ATOL))


def _compare(groups, pattern: str, kwargs: dict) -> dict:
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.train.tensor_parallel import apply_tensor_parallel, full_tensors
    from hybrid_lm.typed_config import from_dict

    torch.manual_seed(0)
    full = HybridLM(from_dict(ModelConfig, dict(vocab_size=V, d_model=D, **kwargs)))
    split = apply_tensor_parallel(copy.deepcopy(full), groups)
    batch = _batch()
    out = {"n_local": sum(p.numel() for p in split.parameters()), "n_full": sum(p.numel() for p in full.parameters())}
    # the split weights are the full model's, cut exactly
    weights = full_tensors(split, groups)
    out["weights_equal"] = all(torch.equal(weights[n], p) for n, p in full.named_parameters())
    ref, got = full(**batch), split(**batch)
    out["logits"], out["loss"] = _np(ref.logits, got.logits), _np(ref.loss, got.loss)
    ref.loss.backward()
    got.loss.backward()
    grads = full_tensors(split, groups, grads=True)
    out["grads"] = {n: _np(grads[n], p.grad) for n, p in full.named_parameters() if p.grad is not None}
    out["no_grad"] = sorted(n for n, p in full.named_parameters() if p.grad is None or n not in grads)
    # two calls with the carried (local-head) state equal the unsplit model's two calls
    t = T // 2 + 1
    ids, docs = batch["input_ids"], batch["doc_ids"]
    with torch.no_grad():
        r1, g1 = (m(ids[:, :t], doc_ids=docs[:, :t], return_states=True) for m in (full, split))
        r2 = full(ids[:, t:], doc_ids=docs[:, t:], states=r1.states)
        g2 = split(ids[:, t:], doc_ids=docs[:, t:], states=g1.states)
    out["carried"] = _np(r2.logits, g2.logits)
    return out


def _worker(rank: int, world_size: int, cases: dict) -> dict:
    from hybrid_lm.train.distributed import init_distributed
    from hybrid_lm.train.process_groups import init_process_groups

    init_distributed()
    groups = init_process_groups(tensor_parallel=world_size)
    results = {}
    for pattern, kwargs in cases.items():
        try:
            results[pattern] = _compare(groups, pattern, kwargs)
        except Exception:  # noqa: BLE001 - reported per case by the parametrised test
            results[pattern] = {"error": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def tp2_results() -> list[dict]:
    return run_distributed(_worker, 2, args=(CASES,))


pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("pattern", list(CASES))
def test_tp2_equals_one_process(tp2_results, pattern):
    for rank, results in enumerate(tp2_results):
        res = results[pattern]
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        assert res["weights_equal"], f"rank {rank}: gathered shards differ from the full weights"
        assert res["n_local"] < res["n_full"], "nothing was split"
        assert res["no_grad"] == [], f"rank {rank}: parameters without a gradient: {res['no_grad']}"
        for key in ("logits", "loss", "carried"):
            ref, got = map(torch.from_numpy, res[key])
            torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"rank {rank} {key}: {m}")
        for name, pair in res["grads"].items():
            got, ref = map(torch.from_numpy, pair)
            assert _max_rel(got, ref) < RTOL, f"rank {rank} grad {name}: max rel diff {_max_rel(got, ref):.2e}"
