"""JobConfig: every shipped config parses; bad keys and types fail naming the key, in-process and via the CLI."""
from pathlib import Path

import pytest

from hybrid_lm.cli import main as cli_main
from hybrid_lm.train.config import JobConfig, job_config_to_dict, load_job_config
from hybrid_lm.typed_config import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
# the overrides below are tried on a small config: a scale one (warm-up 1000 steps) refuses train.steps=123
DEBUG = CONFIGS[0].parent / "debug.yaml"


def test_configs_exist():
    assert {"debug.yaml", "tiny.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_and_round_trips(path):
    cfg = load_job_config(path)
    assert isinstance(cfg, JobConfig)
    again = load_job_config(path, [])
    assert job_config_to_dict(again) == job_config_to_dict(cfg)


def test_overrides_apply(tmp_path):
    cfg = load_job_config(DEBUG, ["train.steps=123", "parallel.zero_stage=2", "train.debug_nan_steps=[3,4]"])
    assert cfg.train.steps == 123 and cfg.parallel.zero_stage == 2 and cfg.train.debug_nan_steps == [3, 4]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key train\.stepz"):
        load_job_config(DEBUG, ["train.stepz=5"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage: expected int, got 'two'"):
        load_job_config(DEBUG, ["parallel.zero_stage=two"])


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage: must be 0, 1, 2 or 3"):
        load_job_config(DEBUG, ["parallel.zero_stage=4"])


def test_cli_rejects_bad_config_before_training(capsys):
    assert cli_main(["train", str(DEBUG), "optim.betaz=[0.9,0.9]"]) == 2
    assert "unknown config key optim.betaz" in capsys.readouterr().err
    assert cli_main(["train", str(DEBUG), "train.steps=ten"]) == 2
    assert "train.steps: expected int, got 'ten'" in capsys.readouterr().err
