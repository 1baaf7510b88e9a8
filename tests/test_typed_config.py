"""The strict config layer: unknown keys and wrong types fail with the dotted key named."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from hybrid_lm.typed_config import ConfigError, apply_overrides, from_dict, load_file, to_dict


@dataclass
class Inner:
    n_heads: int = 4
    window: Optional[int] = None
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    lr: float = 1e-3
    name: str = "x"
    flags: list[int] = field(default_factory=list)
    span: tuple[float, float] = (1.0, 2.0)
    inner: Inner = field(default_factory=Inner)


def test_round_trip_and_int_to_float():
    cfg = from_dict(Outer, {"lr": 1, "inner": {"window": 8, "kind": "b"}, "span": [0.5, 3]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner == Inner(window=8, kind="b")
    assert cfg.span == (0.5, 3.0)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"n_head": 3}}, "unknown config key inner.n_head"),
        ({"inner": {"n_heads": "eight"}}, "inner.n_heads: expected int"),
        ({"inner": {"kind": "c"}}, "inner.kind: 'c' is not one of"),
        ({"flags": [1, "x"]}, "flags[1]: expected int"),
        ({"lr": True}, "lr: expected float"),
        ({"span": [1.0]}, "span: expected 2 items"),
        ({"inner": 3}, "inner: expected a mapping"),
    ],
    ids=["unknown-key", "wrong-type", "literal", "list-item", "bool-not-float", "tuple-len", "section"],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as exc:
        from_dict(Outer, data)
    assert message in str(exc.value)


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({"inner": {"n_heads": 4}}, ["inner.n_heads=8", "inner.window=null", "flags=[1, 2]", "name=abc"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.n_heads == 8 and cfg.inner.window is None and cfg.flags == [1, 2] and cfg.name == "abc"
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["inner.n_heads"])


def test_load_yaml_and_toml(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 0.5\ninner:\n  n_heads: 2\n")
    (tmp_path / "a.toml").write_text("lr = 0.5\n[inner]\nn_heads = 2\n")
    assert load_file(tmp_path / "a.yaml") == load_file(tmp_path / "a.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text", ["1e-3", "3E-3", " 1e-3 ", "+2.5e-4", ".5"])
def test_float_fields_accept_the_floats_people_write(tmp_path, text):
    """PyYAML follows YAML 1.1, whose floats need a dot: ``lr: 3e-3`` and the override ``lr=1e-3``
    arrive as strings; a float field takes any string ``float()`` parses (and ints, and tuples of them)."""
    expected = float(text)
    cfg = from_dict(Outer, apply_overrides({}, [f"lr={text}", f"span=[{text}, 2]"]))
    assert cfg.lr == expected and isinstance(cfg.lr, float) and cfg.span == (expected, 2.0)
    (tmp_path / "a.yaml").write_text(f"lr: {text}\n")
    assert from_dict(Outer, load_file(tmp_path / "a.yaml")).lr == expected


@pytest.mark.parametrize("value", ["fast", "", "1e-3x", [1.0], None])
def test_float_fields_still_refuse_what_is_not_a_number(value):
    with pytest.raises(ConfigError, match="lr: (expected float|may not be null)"):
        from_dict(Outer, {"lr": value})


def test_cli_override_of_lr_in_exponent_form(capsys):
    from pathlib import Path

    from hybrid_lm.cli import main as cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
    assert cli_main(["train", str(config), "optim.lr=1e-3", "--print-config"]) == 0
    assert '"lr": 0.001' in capsys.readouterr().out


@pytest.mark.parametrize("name, text, where", [
    ("bad.yaml", "model:\n  d_model: 64\n bad: [1\n", ":3:2: "),
    ("bad.yml", "train:\n  steps: 5\n  seed: {a: 1\n", ":4:1: "),
    ("tab.yaml", "train:\n\tsteps: 5\n", ":2:1: "),
    ("bad.toml", "[train]\nsteps = 5\n[model\n", ":3:7: "),
    ("bad.json", '{"train": {"steps": 5,}}', ":1:23: "),
    ("latin1.yaml", "train:\n  run_dir: caf\xe9\n", "not UTF-8"),
], ids=["yaml-indent", "yaml-unclosed", "yaml-tab", "toml", "json", "not-utf8"])
def test_malformed_config_file_is_one_line_naming_file_line_and_column(tmp_path, capsys, name, text, where):
    from hybrid_lm.cli import main as cli_main

    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_file(path)
    assert f"{path}{where}" in str(exc.value) if where.startswith(":") else where in str(exc.value)
    assert "\n" not in str(exc.value)
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err
