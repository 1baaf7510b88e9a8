"""A ZeRO-3 checkpoint written by 2 processes exports to the very weights the training held.

Two trainings of the same global batch (2 ranks x 1 micro-batch under ZeRO-3, 1 rank x 2 micro-
batches under ZeRO-0) on the engine's synthetic loader, then ``hybrid-lm export`` of each. The
reference is gathered independently of the checkpoint: each rank program wraps the engine's
``parallelize`` to keep the initial weights and, after training, all-gathers the live parameters
with ``deepspeed.zero.GatheredParameters`` and writes them to a safetensors file on rank 0. The
export (``zero_to_fp32`` over the shard files) must equal those bitwise, and differ from the
initial weights. The two runs agree only to the engine's parity tolerance: 2-rank all-reduce and
2-step accumulation round differently (measured: up to ~7e-9 absolute, so not bitwise).
"""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("hybrid_lm.train.checkpoint", reason="the training engine (hybrid_lm.train.checkpoint) is missing")

TESTS = Path(__file__).resolve().parents[1]
for extra in (TESTS, TESTS / "train"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import synthetic  # noqa: E402  (the engine tests' in-memory loader)
from distributed_utils import run_distributed  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODEL = {"vocab_size": 64, "d_model": 32, "layer_pattern": "A-", "attention": {"n_heads": 4},
         "mlp": {"hidden_size": 48}}


def _train(rank, world_size, job, weights_dir):
    """Train; rank 0 writes ``init.safetensors`` and ``final.safetensors`` into ``weights_dir``."""
    import deepspeed
    from safetensors.torch import save_file

    import hybrid_lm.train.loop as loop_mod
    from hybrid_lm.train.config import job_config_from_dict

    captured = {}
    original = loop_mod.parallelize

    def spy(model, *args, **kwargs):
        # before DeepSpeed partitions it, the model holds the seeded initial weights (same on every rank)
        captured["init"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        captured["engine"] = original(model, *args, **kwargs)
        return captured["engine"]

    loop_mod.parallelize = spy
    try:
        result = loop_mod.train(job_config_from_dict(job), make_loader=synthetic.factory())
    finally:
        loop_mod.parallelize = original
    module = captured["engine"].module
    # a collective under ZeRO-3 (every rank joins), a no-op under ZeRO-0; the last step saved the
    # final checkpoint and nothing changes the weights after it
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        final = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if rank == 0:
        Path(weights_dir).mkdir(parents=True, exist_ok=True)
        save_file(captured["init"], str(Path(weights_dir) / "init.safetensors"))
        save_file(final, str(Path(weights_dir) / "final.safetensors"))
    return str(result.checkpoint)


def _job(run_dir, zero_stage, gas):
    job = synthetic.job_dict(run_dir, steps=3, zero_stage=zero_stage, gas=gas, schedule={"warmup_steps": 1})
    job["model"] = dict(MODEL)
    return job


def _as_hf(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from hybrid_lm.models.attention.hf_mapping import hf_llama_name

    # tied embeddings: the export stores the head once, as the embedding
    return {hf_llama_name(k): v for k, v in ours.items() if k != "lm_head.weight"}


def test_zero3_two_ranks_exports_the_gathered_weights(tmp_path):
    from hybrid_lm.cli import main as cli_main
    from hybrid_lm.train.checkpoint import load_model_state

    run_distributed(_train, 2, args=(_job(tmp_path / "z3", 3, 1), tmp_path / "live3"))
    run_distributed(_train, 1, args=(_job(tmp_path / "z0", 0, 2), tmp_path / "live0"))
    assert cli_main(["export", str(tmp_path / "z3"), str(tmp_path / "hf3")]) == 0
    assert cli_main(["export", str(tmp_path / "z0"), str(tmp_path / "hf0")]) == 0
    loaded = load_model_state(tmp_path / "z3")
    assert loaded.job_config["parallel"]["zero_stage"] == 3 and loaded.model_config.tie_embeddings
    assert loaded.step == 3

    init = _as_hf(load_file(str(tmp_path / "live3" / "init.safetensors")))
    init0 = _as_hf(load_file(str(tmp_path / "live0" / "init.safetensors")))
    assert sorted(init) == sorted(init0) and all(torch.equal(init[k], init0[k]) for k in init)  # same seed
    for stage in ("3", "0"):
        exported = load_file(str(tmp_path / f"hf{stage}" / "model.safetensors"))
        gathered = _as_hf(load_file(str(tmp_path / f"live{stage}" / "final.safetensors")))
        assert sorted(exported) == sorted(gathered) == sorted(init)
        for name, tensor in gathered.items():
            assert exported[name].dtype == torch.float32
            assert torch.equal(exported[name], tensor), (stage, name)
            assert not torch.equal(exported[name], init[name]), (stage, name)  # three steps moved it
    three = load_file(str(tmp_path / "hf3" / "model.safetensors"))
    zero = load_file(str(tmp_path / "hf0" / "model.safetensors"))
    for name, tensor in zero.items():
        torch.testing.assert_close(three[name], tensor, rtol=1e-4, atol=1e-5)
