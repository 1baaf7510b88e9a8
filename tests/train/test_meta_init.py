"""Large-model construction (``train/meta_init.py``): a model built on the meta device, then given
storage and initialised, equals the eager ``HybridLM(cfg)`` (or ``HMTLM(cfg)``) of the same seed bit for bit (every
layer family's own init included); split by tensor parallelism first, each rank allocates only its
shards, which equal the eager model's cut; activation checkpointing composes with the split model
(those two run in ``test_tensor_parallel.py``'s 2-rank spawn: ``meta_init_case``).
"""
from __future__ import annotations

import traceback

import pytest
import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hmt.model import HMTLM
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.train.meta_init import materialize
from hybrid_lm.typed_config import from_dict

TITANS = dict(n_heads=2, chunk_size=4, segment_len=8, window=8, n_persistent=2, memory_expansion=2)
CONFIGS = {
    "MAT-CGLX-": dict(layer_pattern="MAT-CGLX-", attention=dict(n_heads=2), titans=TITANS,
                      mamba2=dict(d_state=8, headdim=8, chunk_size=8),
                      atlas=dict(omega_window=2, poly_degree=2, poly_form="monomial", optimizer="momentum")),
    "D-, untied": dict(layer_pattern="D-", tie_embeddings=False, titans=dict(TITANS, conv_size=0),
                       atlas=dict(deep_transformer=dict(poly_degree=1))),
}


def _config(kwargs: dict) -> ModelConfig:
    return from_dict(ModelConfig, dict(vocab_size=64, d_model=32, **kwargs))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_then_materialize_equals_eager(name):
    cfg = _config(CONFIGS[name])
    torch.manual_seed(7)
    eager = HybridLM(cfg)
    with torch.device("meta"):
        model = HybridLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, torch.device("cpu"), seed=7)
    ref = dict(eager.named_parameters())
    got = dict(model.named_parameters())
    assert got.keys() == ref.keys()
    for n, p in got.items():
        assert torch.equal(p, ref[n]), n
        for mark in ("_keep_fp32", "_is_residual_projection", "_no_weight_decay"):
            assert getattr(p, mark, False) == getattr(ref[n], mark, False), (n, mark)
    assert (model.lm_head.weight is model.embed.weight) == cfg.tie_embeddings
    # layers' own reset_parameters reached: Mamba-2 A_log/dt_bias/D, the memory's w0 and gate biases
    assert any(n.endswith("A_log") for n in got) or name.startswith("D")
    assert any(".w0." in n for n in got)


HMT = dict(segment_length=16, sensory_tokens=2, cache_size=4, bptt_depth=2)


def test_hmt_meta_then_materialize_equals_eager():
    """An HMT model: its backbone as a plain stack's, then its own (replicated) parameters, one
    RNG stream in the eager order."""
    cfg = _config(dict(CONFIGS["MAT-CGLX-"], hmt=HMT))
    torch.manual_seed(3)
    eager = HMTLM(cfg)
    with torch.device("meta"):
        model = HMTLM(cfg)
    materialize(model, torch.device("cpu"), seed=3)
    ref = dict(eager.named_parameters())
    got = dict(model.named_parameters())
    assert got.keys() == ref.keys() and {"summary_prompt", "memory_init", "recall_q.weight"} <= got.keys()
    for n, p in got.items():
        assert torch.equal(p, ref[n]), n
    # one stream: the HMT draws follow the backbone's rather than repeating them
    assert not torch.equal(model.summary_prompt, model.memory_init)


TP_MODEL = dict(layer_pattern="M-A-T-", attention=dict(n_heads=2), titans=TITANS,
                mamba2=dict(d_state=8, headdim=8, ngroups=2, chunk_size=8))


def meta_init_case(groups) -> dict:
    """Run on each of 2 TP ranks inside ``test_tensor_parallel.py``'s spawn (its start-up, megatron-core
    and the process group, is most of the cost): the meta path vs the eager model cut, the bytes
    allocated, and activation checkpointing on the split model."""
    from hybrid_lm.train.activation_checkpointing import apply_activation_checkpointing
    from hybrid_lm.train.tensor_parallel import apply_tensor_parallel

    out: dict = {}
    try:
        cfg = _config(TP_MODEL)
        torch.manual_seed(5)
        eager = apply_tensor_parallel(HybridLM(cfg), groups)
        with torch.device("meta"):
            model = HybridLM(cfg)
        apply_tensor_parallel(model, groups)
        materialize(model, torch.device("cpu"), seed=5, groups=groups)
        ref = dict(eager.named_parameters())
        out["unequal"] = [n for n, p in model.named_parameters() if not torch.equal(p, ref[n])]
        out["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["eager_bytes"] = sum(p.numel() * p.element_size() for p in eager.parameters())
        with torch.device("meta"):
            out["full_bytes"] = sum(p.numel() * p.element_size() for p in HybridLM(cfg).parameters())
        out["split_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()
                                 if getattr(p, "_tp_split", None) is not None)
        # activation checkpointing on the split model: the recompute repeats its collectives, same results
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (2, 16), generator=g)
        losses, grads = [], []
        for ac in ("none", "full"):
            apply_activation_checkpointing(model, ac)
            model.zero_grad()
            loss = model(ids, labels=torch.roll(ids, -1, dims=1)).loss
            loss.backward()
            losses.append(float(loss))
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        out["ac_loss_equal"] = losses[0] == losses[1]
        # an HMT model over the same stack: the backbone cut as above, HMT's own parameters whole
        hmt_cfg = _config(dict(TP_MODEL, hmt=HMT))
        torch.manual_seed(5)
        eager_hmt = apply_tensor_parallel(HMTLM(hmt_cfg), groups)
        with torch.device("meta"):
            hmt = HMTLM(hmt_cfg)
        materialize(apply_tensor_parallel(hmt, groups), torch.device("cpu"), seed=5, groups=groups)
        ref = dict(eager_hmt.named_parameters())
        out["hmt_unequal"] = [n for n, p in hmt.named_parameters() if not torch.equal(p, ref[n])]
        out["hmt_backbone_bytes"] = sum(p.numel() * p.element_size() for p in hmt.backbone.parameters())
        out["ac_grads_unequal"] = [n for n in grads[0] if not torch.equal(grads[0][n], grads[1][n])]
        # the materialised model computes as the eager split one: TP's gradient hooks (the partial
        # gradients of shared per-head parameters summed over the ranks) came through
        eager(ids, labels=torch.roll(ids, -1, dims=1)).loss.backward()
        out["eager_grads_unequal"] = [n for n, p in eager.named_parameters()
                                      if p.grad is not None and not torch.equal(p.grad, grads[0][n])]
        out["partial_grad_hooks"] = sum(bool(getattr(p, "_backward_hooks", None)) for p in model.parameters())
    except Exception:  # noqa: BLE001 - reported by the test
        out["error"] = traceback.format_exc()
    return out


def check_meta_init_tp2(results: list[dict]) -> None:
    """The assertions on ``meta_init_case``'s results by rank (called from ``test_tensor_parallel.py``)."""
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
        assert res["unequal"] == [], f"rank {rank}: differ from the eager model's cut: {res['unequal']}"
        assert res["bytes"] == res["eager_bytes"]
        # each rank holds half of every split parameter and all of the replicated ones
        replicated = res["bytes"] - res["split_bytes"]
        assert res["split_bytes"] * 2 + replicated == res["full_bytes"], res
        assert res["bytes"] < 0.6 * res["full_bytes"], res
        assert res["ac_loss_equal"] and res["ac_grads_unequal"] == [], res
        assert res["hmt_unequal"] == [] and res["hmt_backbone_bytes"] == res["bytes"], res  # cut as the plain stack
        assert res["eager_grads_unequal"] == [] and res["partial_grad_hooks"] > 0, res
