"""``parallel.tensor_parallel`` at config load, and the plans' bookkeeping, in one process (fast).

The equality of a split model with the full one is tests/train/test_tensor_parallel.py (2 ranks).
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hybrid_lm.cli import main as cli_main
from hybrid_lm.models.common.mixer import Layer
from hybrid_lm.models.common.registry import layer_specs
from hybrid_lm.models.common.tp_plan import Split, has_plan, tp_requirements
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.train.config import load_job_config
from hybrid_lm.train.tensor_parallel import apply_tensor_parallel, shard, unshard
from hybrid_lm.typed_config import from_dict

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"  # M-A-, d_model 64, vocab 258

REFUSED = [
    (["parallel.tensor_parallel=4", "model.vocab_size=264", "model.layer_pattern=A-", "model.d_model=96",
      "model.attention.n_heads=6"], "model.attention.n_heads: 6 is not divisible by parallel.tensor_parallel=4"),
    (["parallel.tensor_parallel=2", "model.vocab_size=264", "model.layer_pattern=A-", "model.attention.n_kv_heads=1"],
     "model.attention.n_kv_heads: 1 is not divisible by parallel.tensor_parallel=2"),
    (["parallel.tensor_parallel=2"], "model.mamba2.ngroups: 1 is not divisible by parallel.tensor_parallel=2"),
    (["parallel.tensor_parallel=4", "model.vocab_size=264", "model.mamba2.ngroups=2", "model.mamba2.headdim=64"],
     "model.mamba2.headdim: 2 (SSM heads = expand*d_model/headdim = 2*64/64) is not divisible by "
     "parallel.tensor_parallel=4"),
    (["parallel.tensor_parallel=4", "model.mamba2.ngroups=4"], "model.vocab_size: 258 is not divisible by "
                                                                 "parallel.tensor_parallel=4"),
    (["parallel.tensor_parallel=2", "model.vocab_size=264", "model.layer_pattern=A-", "model.mlp.hidden_size=99"],
     "model.mlp.hidden_size: 99 is not divisible by parallel.tensor_parallel=2"),
    (["parallel.tensor_parallel=2", "model.vocab_size=264", "model.layer_pattern=T-", "model.titans.n_heads=1"],
     "model.titans.n_heads: 1 is not divisible by parallel.tensor_parallel=2"),
    (["parallel.tensor_parallel=2", "model.vocab_size=264", "model.layer_pattern=X-", "model.titans.n_heads=1"],
     "model.titans.n_heads: 1 is not divisible by parallel.tensor_parallel=2"),
    (["parallel.tensor_parallel=0"], "parallel.tensor_parallel: must be >= 1, got 0"),
    (["parallel.tensor_parallel=2", "model.mamba2.ngroups=2", "parallel.zero_stage=3"],
     "parallel.zero_stage: 3 cannot be combined with parallel.tensor_parallel=2 (use zero_stage 0, 1 or 2)"),
    (["parallel.tensor_parallel=2", "model.mamba2.ngroups=2", "parallel.zero_stage=1", "parallel.cpu_offload=true"],
     "parallel.cpu_offload: not supported with parallel.tensor_parallel=2"),
]


@pytest.fixture
def no_worker(monkeypatch):
    import torch.distributed.run

    import hybrid_lm.train.loop

    def reached(*args, **kwargs):
        raise AssertionError("a worker was started for an impossible config")

    monkeypatch.setattr(hybrid_lm.train.loop, "train", reached)
    monkeypatch.setattr(torch.distributed.run, "main", reached)


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_degree_the_model_cannot_split_is_refused_at_load(overrides, message, capsys, no_worker):
    assert cli_main(["train", str(DEBUG), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"hybrid-lm train: config error: {message}", err


def test_a_splittable_degree_loads():
    """The shapes pass, and the loop trains it (tests/train/test_tensor_parallel_training.py)."""
    for zero in (0, 1, 2):
        cfg = load_job_config(DEBUG, ["parallel.tensor_parallel=2", "model.mamba2.ngroups=2", f"parallel.zero_stage={zero}"])
        assert cfg.parallel.tensor_parallel == 2
    assert load_job_config(DEBUG).parallel.tensor_parallel == 1


def test_shard_keeps_each_components_piece_and_unshard_inverts_it():
    # a fused [a (4 rows), b (2 rows)] projection over 2 ranks: rank r holds a's and b's r-th halves
    full = torch.arange(6 * 3).view(6, 3)
    split = Split(0, (4, 2))
    parts = [shard(full, split, r, 2) for r in range(2)]
    assert parts[0].tolist() == full[[0, 1, 4]].tolist() and parts[1].tolist() == full[[2, 3, 5]].tolist()
    assert torch.equal(unshard(parts, split), full)
    cols = Split(1, (3,))
    assert torch.equal(unshard([shard(full, cols, r, 3) for r in range(3)], cols), full)


def _tiny(pattern: str) -> HybridLM:
    sections = dict(attention=dict(n_heads=2), mamba2=dict(d_state=8, headdim=8, ngroups=2, chunk_size=8))
    return HybridLM(from_dict(ModelConfig, dict(vocab_size=64, d_model=32, layer_pattern=pattern, **sections)))


@pytest.mark.parametrize("letter", sorted(layer_specs()))
def test_every_registered_letter_has_a_plan_and_requirements(letter):
    model = _tiny(letter)
    layers = [m for m in model.modules() if isinstance(m, Layer)]
    assert layers and all(has_plan(m) for m in layers), [type(m).__name__ for m in layers if not has_plan(m)]
    keys = {r.key for r in tp_requirements(model.config)}
    assert "vocab_size" in keys and len(keys) > 1, keys  # the model-wide entry and the letter's own


def test_a_layer_without_a_plan_is_refused():
    class Unplanned(Layer):
        pass

    model = _tiny("A-")
    model.blocks[0].layer = Unplanned()
    groups = SimpleNamespace(tp_size=2, tp_rank=0, tp_group=None)
    with pytest.raises(NotImplementedError, match="no tensor-parallel plan for layer class.*Unplanned"):
        apply_tensor_parallel(model, groups)
