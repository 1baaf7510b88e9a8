"""``parallel.context_parallel`` at config load, batch slicing and the attach step, in one process (fast).

The equality with one process is tests/train/test_context_parallel_attention.py (layers, 4 ranks)
and tests/train/test_context_parallel_training.py (the engine, 2 ranks).
"""
from pathlib import Path

import pytest
import torch

from hybrid_lm.cli import main as cli_main
from hybrid_lm.models.common.mixer import Layer
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.train.config import load_job_config
from hybrid_lm.train.context_parallel import ContextParallel
from hybrid_lm.train.context_parallel.apply import apply_context_parallel, slice_batch
from hybrid_lm.typed_config import from_dict

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"  # M-A-, 4 heads, seq_len 64

REFUSED = [
    (["parallel.context_parallel=0"], "parallel.context_parallel: must be >= 1, got 0"),
    (["parallel.context_parallel=2", "data.seq_len=66", "parallel.context_parallel_layout=zigzag"],
     "data.seq_len: 66 is not divisible by the 4 slices of parallel.context_parallel=2 with "
     "context_parallel_layout=zigzag"),
    (["parallel.context_parallel=3", "data.seq_len=66", "parallel.context_parallel_attention=ulysses"],
     "parallel.context_parallel_attention: ulysses needs model.attention.n_heads=4 divisible by "
     "parallel.context_parallel=3 (or use allgather)"),
    (["parallel.context_parallel=2", "parallel.tensor_parallel=2", "model.mamba2.ngroups=2"],
     "parallel.context_parallel: 2 with parallel.tensor_parallel=2 supports attention (A) and MLP (-) layers "
     "only, not 'M' (Mamba2) yet"),
    (["parallel.context_parallel=2", "parallel.tensor_parallel=2", "model.layer_pattern=A-",
      "parallel.sequence_parallel=true"],
     "parallel.sequence_parallel: not supported with parallel.context_parallel=2 yet"),
    (["parallel.context_parallel=4", "parallel.tensor_parallel=2", "model.layer_pattern=A-",
      "parallel.context_parallel_attention=ulysses"],  # 4 heads, but 2 per TP rank
     "parallel.context_parallel_attention: ulysses needs model.attention.n_heads=4 / parallel.tensor_parallel=2 "
     "divisible by parallel.context_parallel=4 (or use allgather)"),
    (["parallel.context_parallel=2", "parallel.pipeline_parallel=2"],
     "parallel.context_parallel: 2 cannot be combined with parallel.pipeline_parallel=2 yet"),
    (["parallel.context_parallel=2", "parallel.zero_stage=3"],
     "parallel.zero_stage: 3 cannot be combined with parallel.context_parallel=2 (use zero_stage 0, 1 or 2)"),
    (["parallel.context_parallel=2", "parallel.zero_stage=1", "parallel.cpu_offload=true"],
     "parallel.cpu_offload: not supported with parallel.context_parallel=2"),
    (["parallel.context_parallel=2", "parallel.activation_checkpointing=full"],
     "parallel.activation_checkpointing: full cannot be combined with parallel.context_parallel=2 yet"),
    (["parallel.context_parallel=2", "parallel.context_parallel_attention=ring"],
     "parallel.context_parallel_attention: 'ring' is not one of ['allgather', 'ulysses']"),
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
def test_impossible_context_parallel_is_refused_at_load(overrides, message, capsys, no_worker):
    assert cli_main(["train", str(DEBUG), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hybrid-lm train: config error: {message}"), err


def test_possible_context_parallel_loads():
    for layout in ("contiguous", "zigzag"):
        for scheme in ("allgather", "ulysses"):
            cfg = load_job_config(DEBUG, ["parallel.context_parallel=4", f"parallel.context_parallel_layout={layout}",
                                          f"parallel.context_parallel_attention={scheme}", "parallel.zero_stage=2"])
            assert cfg.parallel.context_parallel == 4


def test_slice_batch_cuts_every_key_alike_and_keeps_global_positions():
    batch = {"input_ids": torch.arange(16).view(2, 8), "labels": torch.arange(16).view(2, 8) + 100,
             "doc_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]] * 2),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]] * 2)}
    zig = [slice_batch(batch, ContextParallel(None, r, 2, 8, "zigzag")) for r in range(2)]
    assert zig[0]["input_ids"][0].tolist() == [0, 1, 6, 7] and zig[1]["input_ids"][0].tolist() == [2, 3, 4, 5]
    assert zig[0]["labels"][1].tolist() == [108, 109, 114, 115]
    assert zig[0]["position_ids"][0].tolist() == [0, 1, 3, 0]  # the documents' positions, not 0..3
    assert zig[1]["doc_ids"][0].tolist() == [0, 1, 1, 1]
    contiguous = slice_batch(batch, ContextParallel(None, 1, 2, 8))
    assert contiguous["input_ids"][0].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="'input_ids' has length 8, expected the global sequence length 16"):
        slice_batch(batch, ContextParallel(None, 0, 2, 16))


def _tiny(pattern: str) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(from_dict(ModelConfig, dict(vocab_size=32, d_model=16, layer_pattern=pattern,
                                                attention=dict(n_heads=2), mamba2=dict(d_state=4, headdim=8))))


class _Stateful(Layer):
    stateful = True

    def forward(self, x, **kwargs):
        return x, None


def test_attach_keeps_the_model_and_refuses_a_stateful_layer_without_cp_forward():
    model = _tiny("A-")
    keys = list(model.state_dict())
    ids = torch.randint(0, 32, (1, 8))
    before = model(ids).logits
    runtime = apply_context_parallel(model, ContextParallel(None, 0, 2, 8))
    assert list(model.state_dict()) == keys and not runtime.active
    # outside runtime.sharded() every layer runs its own forward: evaluation sees whole sequences
    assert torch.equal(model(ids).logits, before)

    other = _tiny("A-")
    other.blocks[1].layer = _Stateful()
    with pytest.raises(ValueError, match=r"layer '-' \(block 1, _Stateful\) has no context-parallel forward"):
        apply_context_parallel(other, ContextParallel(None, 0, 2, 8))
    assert "forward" not in vars(other.blocks[0].layer)  # refused before anything was attached
