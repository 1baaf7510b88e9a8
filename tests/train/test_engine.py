"""The training loop in one process on the synthetic loader: learning, exact resume, NaN skip,
divergence abort, corrupted-checkpoint fallback, init_from."""
import shutil

import pytest
import torch

import synthetic
from hybrid_lm.train.checkpoint import CheckpointError, layout, load_model_state
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.faults import TrainingDiverged
from hybrid_lm.train.loop import train


def _run(run_dir, **kw):
    return train(job_config_from_dict(synthetic.job_dict(run_dir, **kw)), make_loader=synthetic.factory())


def test_loss_falls(tmp_path):
    result = _run(tmp_path, steps=60, eval={"every": 60}, train={"eval_at_start": True},
                  schedule={}, optim={"lr": 1e-2})
    before, after = result.evals[0]["val_loss"], result.evals[60]["val_loss"]
    assert before > 3.5  # ~log(64) at init
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("zero_stage", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_exact_resume_single_process(tmp_path, zero_stage):
    straight = _run(tmp_path / "a", steps=8, zero_stage=zero_stage, gas=2)
    first = _run(tmp_path / "b", steps=8, zero_stage=zero_stage, gas=2, train={"stop_at": 4})
    assert first.stopped_by_signal and first.step == 4
    second = _run(tmp_path / "b", steps=8, zero_stage=zero_stage, gas=2)
    assert sorted(second.losses) == [4, 5, 6, 7]
    assert {**first.losses, **second.losses} == straight.losses  # bitwise
    a, b = load_model_state(straight.checkpoint), load_model_state(second.checkpoint)
    assert a.step == b.step == 8
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name


def test_nan_step_is_skipped_and_counted(tmp_path, capsys):
    import json
    import math

    # step 5 everywhere: debug_nan_steps, the message, the metrics row, the step-N checkpoints
    result = _run(tmp_path, steps=7, train={"debug_nan_steps": [5]}, checkpoint={"every": 1, "keep": 10})
    assert result.state.nan_skipped == 1 and result.state.consecutive_nan == 0
    assert math.isnan(result.losses[4])  # TrainResult.losses is keyed by the step count before the update
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert rows[4]["train/nan_skipped"] == 0 and rows[5]["train/nan_skipped"] == 1
    assert math.isnan(rows[5]["train/loss"]) and math.isfinite(rows[6]["train/loss"])
    weights = {s: load_model_state(tmp_path / "checkpoints" / layout.step_dir_name(s)).state_dict for s in (4, 5, 6)}
    assert all(torch.equal(weights[4][k], weights[5][k]) for k in weights[4])  # step 5 changed nothing
    assert not all(torch.equal(weights[5][k], weights[6][k]) for k in weights[5])
    assert "step 5: non-finite loss" in capsys.readouterr().err


def test_consecutive_nans_abort_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"2 consecutive non-finite losses \(steps 2\.\.3.*max_consecutive_nan=2"):
        _run(tmp_path, steps=6, train={"debug_nan_steps": [2, 3], "max_consecutive_nan": 2})


def test_corrupted_newest_checkpoint_falls_back(tmp_path, capsys):
    straight = _run(tmp_path / "a", steps=6)
    _run(tmp_path / "b", steps=6, checkpoint={"every": 2, "keep": 3}, train={"stop_at": 4})
    newest = tmp_path / "b" / "checkpoints" / "step-0000004"
    victim = sorted((newest / "ds").glob("*model_states.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    resumed = _run(tmp_path / "b", steps=6, checkpoint={"every": 2, "keep": 3})
    err = capsys.readouterr().err
    assert f"skipping step-0000004: {victim}: sha256 mismatch" in err
    assert sorted(resumed.losses) == [2, 3, 4, 5]  # continued from step 2
    assert resumed.losses == {k: v for k, v in straight.losses.items() if k >= 2}


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_auto_resume_refuses_when_every_checkpoint_is_corrupt(tmp_path, capsys, monkeypatch):
    import argparse
    import json

    from hybrid_lm.train import cli, distributed

    # the CLI tears down the process group at exit; DeepSpeed's cached groups would go stale for the
    # trainings that follow in this test process
    monkeypatch.setattr(distributed, "destroy_distributed", lambda: None)

    _run(tmp_path, steps=4, checkpoint={"every": 2, "keep": 2})
    root = tmp_path / "checkpoints"
    victims = [sorted((root / layout.step_dir_name(s) / "ds").glob("*model_states.pt"))[0] for s in (2, 4)]
    for victim in victims:
        _flip_a_byte(victim)
    corrupted = [v.read_bytes() for v in victims]
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* fails verification"):
        _run(tmp_path, steps=4, checkpoint={"every": 2, "keep": 2})
    assert [v.read_bytes() for v in victims] == corrupted  # nothing was overwritten
    job = tmp_path / "job.json"
    job.write_text(json.dumps(synthetic.job_dict(tmp_path, steps=4, checkpoint={"every": 2, "keep": 2})))
    capsys.readouterr()
    args = argparse.Namespace(config=str(job), overrides=[], nproc_per_node=0, print_config=False)
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hybrid-lm train: error: train.resume=auto: every checkpoint in {root} fails verification")
    assert f"{victims[0]}: sha256 mismatch" in err and f"{victims[1]}: sha256 mismatch" in err
    assert "train.resume=never" in err
    fresh = _run(tmp_path, steps=4, checkpoint={"every": 2, "keep": 2}, train={"resume": "never"})
    assert sorted(fresh.losses) == [0, 1, 2, 3]
    assert layout.verify(fresh.checkpoint)["step"] == 4


def test_auto_resume_starts_fresh_over_a_save_that_never_finished(tmp_path):
    from hybrid_lm.train.checkpoint import manager

    (tmp_path / layout.step_dir_name(2)).mkdir()  # renamed from .tmp, killed before its marker
    assert manager.find_resume("auto", tmp_path) is None


def test_init_from_training_checkpoint(tmp_path):
    source = _run(tmp_path / "src", steps=3)
    weights = load_model_state(source.checkpoint).state_dict
    result = _run(tmp_path / "dst", steps=3, train={"init_from": str(tmp_path / "src"), "stop_at": 1})
    # step 0 of the new run starts from the source's final weights: its loss matches a fresh
    # forward of those weights on the same first batch
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.typed_config import from_dict

    model = HybridLM(from_dict(ModelConfig, synthetic.job_dict(tmp_path)["model"]))
    model.load_state_dict(weights)
    batch = next(iter(synthetic.SyntheticLoader("train", 0, 1)))
    expected = model(batch["input_ids"], labels=batch["labels"]).loss.item()
    assert result.losses[0] == pytest.approx(expected, rel=1e-6)
    shutil.rmtree(tmp_path / "src")


def test_tokenizer_larger_than_model_vocab_fails_naming_the_key(tmp_path):
    from hybrid_lm.data.tokenizer import Tokenizer
    from hybrid_lm.typed_config import ConfigError

    shards = tmp_path / "shards"
    Tokenizer.byte_level().save(shards)  # 258 ids, the model below has 64
    cfg = job_config_from_dict(synthetic.job_dict(tmp_path / "run", data={"path": str(shards)}))
    with pytest.raises(ConfigError, match="model.vocab_size: 64 is smaller than the tokenizer's 258"):
        train(cfg, make_loader=synthetic.factory())


def _metric(run_dir, key):
    import json

    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row[key] for row in rows if key in row]


def test_grad_norm_is_reported_at_zero_0_as_zero_2_reports_it(tmp_path):
    # DeepSpeed computes no norm at ZeRO-0 in fp32; ZeRO-2 reports the global norm before clipping
    _run(tmp_path / "z0", steps=4, zero_stage=0, gas=2)
    _run(tmp_path / "z2", steps=4, zero_stage=2, gas=2)
    z0, z2 = _metric(tmp_path / "z0", "train/grad_norm"), _metric(tmp_path / "z2", "train/grad_norm")
    assert len(z0) == len(z2) == 4 and all(n > 0 for n in z2)
    assert z0 == pytest.approx(z2, rel=1e-5)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_cpu_offload_trains_like_no_offload(tmp_path, zero_stage):
    """ZeRO-Offload keeps the fp32 master weights and the optimiser on the CPU; with our own
    optimiser it must follow the same trajectory as the run without offload, and resume exactly."""
    plain = _run(tmp_path / "plain", steps=6, zero_stage=zero_stage)
    offload = _run(tmp_path / "off", steps=6, zero_stage=zero_stage, parallel={"cpu_offload": True})
    assert sorted(offload.losses) == list(range(6))
    for step, loss in plain.losses.items():
        assert offload.losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert offload.losses[5] < offload.losses[0]
    first = _run(tmp_path / "res", steps=6, zero_stage=zero_stage, parallel={"cpu_offload": True},
                 train={"stop_at": 3})
    second = _run(tmp_path / "res", steps=6, zero_stage=zero_stage, parallel={"cpu_offload": True})
    assert {**first.losses, **second.losses} == offload.losses  # bitwise
