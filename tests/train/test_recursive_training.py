"""A relaxed recursive model through the real training path: exact resume, and convert-then-train.

The looped block shares its weights across loops; DeepSpeed sees each shared parameter once and
autograd sums its gradient over the loops (tests/models/test_recursive.py checks that sum).
"""
import torch

import synthetic
from hybrid_lm.cli import main as cli_main
from hybrid_lm.models.model_dir import load_model_dir
from hybrid_lm.train.checkpoint import load_model_state
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.loop import train

LOOPED = {"vocab_size": 64, "d_model": 32, "layer_pattern": "M-A-", "attention": {"n_heads": 4},
          "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8}, "mlp": {"hidden_size": 48},
          "recursion": {"loops": 2, "lora_rank": 4}}


def run(run_dir, model, **sections):
    return train(job_config_from_dict(synthetic.job_dict(run_dir, model=model, **sections)),
                 make_loader=synthetic.factory())


def test_looped_model_resumes_exactly(tmp_path, capsys):
    straight = run(tmp_path / "a", LOOPED, train={"steps": 6})
    # the run's summary line gives the unique and the unrolled parameter counts
    assert "block x 2 loops" in capsys.readouterr().out
    first = run(tmp_path / "b", LOOPED, train={"steps": 6, "stop_at": 3})
    second = run(tmp_path / "b", LOOPED, train={"steps": 6})
    assert {**first.losses, **second.losses} == straight.losses
    a, b = load_model_state(straight.checkpoint), load_model_state(second.checkpoint)
    assert any(k.endswith("lora_B") for k in a.state_dict)
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name


def test_convert_then_train_lowers_the_loss(tmp_path, capsys):
    plain = {**LOOPED, "layer_pattern": "M-A-M-A-", "recursion": {"loops": 1}}
    source = run(tmp_path / "src", plain, train={"steps": 12})
    out = tmp_path / "rec"
    assert cli_main(["recursive", "init", str(source.checkpoint), str(out), "--loops", "2", "--lora-rank", "8"]) == 0
    summary = capsys.readouterr().out
    assert "block 'M-A-' x 2 loops" in summary and "unique parameters" in summary
    config, state, _ = load_model_dir(out)
    assert config.layer_pattern == "M-A-" and config.recursion.loops == 2 and config.recursion.lora_rank == 8
    uptrained = run(tmp_path / "up", {**LOOPED, "recursion": {"loops": 2, "lora_rank": 8}},
                    train={"steps": 8, "init_from": str(out)}, schedule={"warmup_steps": 1})
    losses = [uptrained.losses[s] for s in sorted(uptrained.losses)]
    assert losses[-1] < losses[0]
    # starting from the converted weights, not from a fresh init: the first loss is near where the
    # source ended, far below a fresh model's log(64) = 4.16
    last = max(source.losses)
    assert losses[0] < 0.5 * (source.losses[min(source.losses)] + source.losses[last]), (losses, source.losses)


def test_recursive_init_refuses_a_pattern_that_does_not_loop(tmp_path, capsys):
    plain = {**LOOPED, "layer_pattern": "M-M-A-", "recursion": {"loops": 1}}
    source = run(tmp_path / "src", plain, train={"steps": 2})
    assert cli_main(["recursive", "init", str(source.checkpoint), str(tmp_path / "rec"), "--loops", "2"]) == 1
    assert "loop count must be >= 2 and divide 1" in capsys.readouterr().err
    assert not (tmp_path / "rec").exists()


def test_model_parallel_layouts_are_refused_at_load(tmp_path):
    import pytest

    from hybrid_lm.typed_config import ConfigError

    model = {**LOOPED, "layer_pattern": "A-A-"}  # divisible by every degree: the loop is what is refused
    for key in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
        with pytest.raises(ConfigError, match=rf"parallel\.{key}: 2 is not supported with model\.recursion\.loops=2 "
                                              r"\(a looped model trains with data parallelism / ZeRO only\)"):
            job_config_from_dict(synthetic.job_dict(tmp_path, model=model, parallel={key: 2}))
