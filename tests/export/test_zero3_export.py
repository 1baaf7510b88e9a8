"""A ZeRO-3 checkpoint written by 2 processes exports to the tensors of a single-process run.

Two trainings of the same global batch (2 ranks x 1 micro-batch under ZeRO-3, 1 rank x 2 micro-
batches under ZeRO-0) on the engine's synthetic loader, then ``hybrid-lm export`` of each. The
ZeRO-3 export must hold exactly the consolidated fp32 weights ``load_model_state`` gathers from
the shards, and match the single-process export to the engine's own parity tolerance (summation
order differs between 2-rank all-reduce and 2-step accumulation, ~1e-7 relative).
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


def _train(rank, world_size, job):
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    return str(train(job_config_from_dict(job), make_loader=synthetic.factory()).checkpoint)


def _job(run_dir, zero_stage, gas):
    job = synthetic.job_dict(run_dir, steps=3, zero_stage=zero_stage, gas=gas, schedule={"warmup_steps": 1})
    job["model"] = dict(MODEL)
    return job


def test_zero3_two_ranks_exports_like_one_rank(tmp_path):
    from hybrid_lm.cli import main as cli_main
    from hybrid_lm.models.attention.hf_mapping import hf_llama_name
    from hybrid_lm.train.checkpoint import load_model_state

    run_distributed(_train, 2, args=(_job(tmp_path / "z3", 3, 1),))
    run_distributed(_train, 1, args=(_job(tmp_path / "z0", 0, 2),))
    assert cli_main(["export", str(tmp_path / "z3"), str(tmp_path / "hf3")]) == 0
    assert cli_main(["export", str(tmp_path / "z0"), str(tmp_path / "hf0")]) == 0

    consolidated = load_model_state(tmp_path / "z3")
    assert consolidated.job_config["parallel"]["zero_stage"] == 3
    three, zero = load_file(str(tmp_path / "hf3" / "model.safetensors")), load_file(str(tmp_path / "hf0" / "model.safetensors"))
    assert sorted(three) == sorted(zero)
    for ours, tensor in consolidated.state_dict.items():
        if ours == "lm_head.weight" and consolidated.model_config.tie_embeddings:
            continue  # tied: stored once, as the embedding
        assert torch.equal(three[hf_llama_name(ours)], tensor), ours
    for name, tensor in zero.items():
        torch.testing.assert_close(three[name], tensor, rtol=1e-4, atol=1e-5)
    # the weights moved away from init, so equality above is not two copies of the same init
    assert consolidated.step == 3
