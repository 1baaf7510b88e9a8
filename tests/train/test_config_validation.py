"""Every impossible value fails when the config is loaded, in the launching process, naming its
dotted key: exit code 2, one line, no traceback, no worker (each section checks itself; the few
rules that span sections, such as the LR schedule against ``train.steps``, are ``JobConfig``'s)."""
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_lm.cli import main as cli_main
from hybrid_lm.models.atlas.config import AtlasConfig, DeepTransformerConfig
from hybrid_lm.models.config import ModelConfig, ModelConfigError
from hybrid_lm.models.titans.config import TitansConfig
from hybrid_lm.train.config import load_job_config
from hybrid_lm.typed_config import ConfigError, InvalidValue

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"

# (overrides on top of configs/debug.yaml, the dotted key the message must name)
IMPOSSIBLE = [
    (["model.vocab_size=0"], "model.vocab_size"),
    (["model.d_model=0"], "model.d_model"),
    (["model.layer_pattern=MQ"], "model.layer_pattern"),
    (["model.norm_eps=-1e-5"], "model.norm_eps"),
    (["model.init_std=-0.02"], "model.init_std"),
    (["model.attention.n_heads=0"], "model.attention.n_heads"),
    (["model.attention.n_kv_heads=0"], "model.attention.n_kv_heads"),
    (["model.attention.n_kv_heads=3"], "model.attention.n_kv_heads"),
    (["model.attention.head_dim=0"], "model.attention.head_dim"),
    (["model.attention.head_dim=15"], "model.attention.head_dim"),
    (["model.attention.rope_base=0"], "model.attention.rope_base"),
    (["model.attention.window=0"], "model.attention.window"),
    (["model.mamba2.d_state=0"], "model.mamba2.d_state"),
    (["model.mamba2.d_conv=0"], "model.mamba2.d_conv"),
    (["model.mamba2.expand=0"], "model.mamba2.expand"),
    (["model.mamba2.headdim=0"], "model.mamba2.headdim"),
    (["model.mamba2.headdim=48"], "model.mamba2.headdim"),
    (["model.mamba2.ngroups=0"], "model.mamba2.ngroups"),
    (["model.mamba2.chunk_size=0"], "model.mamba2.chunk_size"),
    (["model.mamba2.dt_min=0"], "model.mamba2.dt_min"),
    (["model.mamba2.dt_max=1e-4"], "model.mamba2.dt_max"),
    (["model.mamba2.dt_init_floor=-1"], "model.mamba2.dt_init_floor"),
    (["model.mamba2.A_init_range=[0,16]"], "model.mamba2.A_init_range"),
    (["model.mamba2.A_init_range=[16,1]"], "model.mamba2.A_init_range"),
    (["model.mlp.hidden_size=0"], "model.mlp.hidden_size"),
    (["model.mlp.multiple_of=0"], "model.mlp.multiple_of"),
    (["model.titans.n_heads=0"], "model.titans.n_heads"),
    (["model.titans.memory_depth=0"], "model.titans.memory_depth"),
    (["model.titans.memory_expansion=0"], "model.titans.memory_expansion"),
    (["model.titans.chunk_size=0"], "model.titans.chunk_size"),
    (["model.titans.conv_size=-1"], "model.titans.conv_size"),
    (["model.titans.theta_max=-1"], "model.titans.theta_max"),
    (["model.titans.n_persistent=-1"], "model.titans.n_persistent"),
    (["model.titans.window=0"], "model.titans.window"),
    (["model.titans.segment_len=0"], "model.titans.segment_len"),
    (["model.titans.rope_base=0"], "model.titans.rope_base"),
    (["model.titans.head_dim=0"], "model.titans.head_dim"),
    (["model.layer_pattern=T-", "model.titans.n_heads=3"], "model.titans.n_heads"),
    (["model.layer_pattern=G-", "model.titans.n_heads=64"], "model.titans.n_heads"),  # odd head dim: no RoPE
    (["model.layer_pattern=C-", "model.titans.segment_len=24"], "model.titans.segment_len"),
    (["model.atlas.omega_window=0"], "model.atlas.omega_window"),
    (["model.atlas.poly_degree=-1"], "model.atlas.poly_degree"),
    (["model.atlas.ns_steps=-1"], "model.atlas.ns_steps"),
    (["model.atlas.deep_transformer.omega_window=0"], "model.atlas.deep_transformer.omega_window"),
    (["model.atlas.deep_transformer.poly_degree=-1"], "model.atlas.deep_transformer.poly_degree"),
    (["data.seq_len=0"], "data.seq_len"),
    (["data.micro_batch_size=0"], "data.micro_batch_size"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.seed=-1"], "data.seed"),
    (["data.prefetch_factor=0"], "data.prefetch_factor"),
    (["data.expected_vocab_size=0"], "data.expected_vocab_size"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.betas=[0.9,1.0]"], "optim.betas"),
    (["optim.betas=[-0.1,0.95]"], "optim.betas"),
    (["optim.eps=-1e-8"], "optim.eps"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["schedule.lr=0"], "schedule.lr"),
    (["schedule.warmup_steps=-1"], "schedule.warmup_steps"),
    (["schedule.warmup_steps=11"], "schedule.warmup_steps"),  # debug.yaml: train.steps=10
    (["schedule.min_lr_ratio=1.5"], "schedule.min_lr_ratio"),
    (["schedule.decay_fraction=-0.1"], "schedule.decay_fraction"),
    (["schedule.cooldown_steps=-1"], "schedule.cooldown_steps"),
    (["schedule.constant_lr_ratio=0"], "schedule.constant_lr_ratio"),
    (["schedule.anneal_steps=-1"], "schedule.anneal_steps"),
    (["parallel.gradient_accumulation=0"], "parallel.gradient_accumulation"),
    (["parallel.timeout_s=0"], "parallel.timeout_s"),
    (["checkpoint.every=-1"], "checkpoint.every"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["logging.every=0"], "logging.every"),
    (["eval.every=-1"], "eval.every"),
    (["eval.max_batches=0"], "eval.max_batches"),
    (["eval.position_buckets=0"], "eval.position_buckets"),
    (["eval.passkey_lengths=[256,64]"], "eval.passkey_lengths"),  # needle + question: 98 bytes
    (["eval.passkey_depths=[1.5]"], "eval.passkey_depths"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=-1"], "train.steps"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["train.max_consecutive_nan=0"], "train.max_consecutive_nan"),
    (["train.spike_sigma=-1"], "train.spike_sigma"),
    (["train.spike_window=0"], "train.spike_window"),
    (["train.stop_at=0"], "train.stop_at"),
]


@pytest.fixture
def no_worker(monkeypatch):
    """Fail the test if training (or torchrun) is reached: the refusal must come before either."""
    import torch.distributed.run

    import hybrid_lm.train.loop

    def reached(*args, **kwargs):
        raise AssertionError("a worker was started for an impossible config")

    monkeypatch.setattr(hybrid_lm.train.loop, "train", reached)
    monkeypatch.setattr(torch.distributed.run, "main", reached)


@pytest.mark.parametrize("overrides, key", IMPOSSIBLE, ids=[" ".join(o) for o, _ in IMPOSSIBLE])
def test_impossible_value_is_refused_at_load_naming_the_key(overrides, key, capsys, no_worker):
    assert cli_main(["train", str(DEBUG), *overrides]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hybrid-lm train: config error: ") and f" {key}: " in lines[0], lines[0]


def test_the_command_line_refuses_before_any_worker():
    """The real console entry point, once: exit code 2 and one line on stderr."""
    result = subprocess.run([sys.executable, "-m", "hybrid_lm.cli", "train", str(DEBUG), "data.seq_len=0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and " data.seq_len: " in result.stderr


def test_possible_values_next_to_the_limits_load():
    cfg = load_job_config(DEBUG, ["model.layer_pattern=C-G-", "model.titans.segment_len=48", "model.titans.conv_size=0",
                                  "model.atlas.poly_degree=0", "optim.betas=[0.0,0.999]", "optim.weight_decay=0",
                                  "checkpoint.every=0", "eval.passkey_depths=[0.0,1.0]", "train.grad_clip=0",
                                  "schedule.warmup_steps=10", "model.mamba2.dt_max=0.001"])
    assert cfg.model.titans.segment_len == 48 and cfg.train.grad_clip == 0.0


def test_sections_check_themselves_outside_the_loader():
    """Built in code, the sections still refuse; the key is relative to the object that was built."""
    with pytest.raises(InvalidValue, match=r"^chunk_size: must be >= 1, got 0$"):
        TitansConfig(chunk_size=0).validate()
    with pytest.raises(InvalidValue, match=r"^deep_transformer\.omega_window: "):
        AtlasConfig(deep_transformer=DeepTransformerConfig(omega_window=0)).validate()
    with pytest.raises(ModelConfigError, match=r"^ModelConfig\.titans\.chunk_size: "):
        ModelConfig(titans=TitansConfig(chunk_size=0))
    assert issubclass(InvalidValue, ConfigError)
