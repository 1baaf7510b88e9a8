"""``hybrid-lm export`` refuses clearly: a non-empty output folder, an architecture with no mapping
for the requested target, weights that disagree with their config."""
import torch
from export_helpers import save_tiny, tiny_config

from hybrid_lm.cli import main as cli_main
from hybrid_lm.export.adapters import select
from hybrid_lm.models.model_dir import ExportError, check_state_dict, load_model_dir
from safetensors.torch import load_file, save_file


def test_refuses_non_empty_output_unless_forced(tmp_path, capsys):
    src, _ = save_tiny(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli_main(["export", str(src), str(out)]) == 1
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert cli_main(["export", str(src), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_native_target_refuses_unmappable_pattern_and_names_reasons(tmp_path, capsys):
    src, _ = save_tiny(tmp_path, "remote_window")
    assert cli_main(["export", str(src), str(tmp_path / "out"), "--target", "native"]) == 1
    err = capsys.readouterr().err
    assert "no export mapping for layer_pattern 'MA-'" in err
    assert "llama:" in err and "mamba2:" in err and "bamba:" in err
    assert not (tmp_path / "out").exists()


def test_selection_by_pattern():
    assert select(tiny_config("llama")).name == "llama"
    assert select(tiny_config("mamba2")).name == "mamba2"
    assert select(tiny_config("bamba")).name == "bamba"
    assert select(tiny_config("remote_window")).name == "remote"  # window: no native class
    assert select(tiny_config("llama", layer_pattern="A-A")).name == "remote"  # unpaired attention
    assert select(tiny_config("bamba", layer_pattern="MA-")).name == "remote"  # two mixers in a row


def test_refuses_weights_that_disagree_with_config(tmp_path, capsys):
    src, _ = save_tiny(tmp_path, "bamba")
    state = load_file(str(src / "model.safetensors"))
    state["blocks.1.layer.up_proj.weight"] = torch.zeros(7, 32)
    del state["final_norm.weight"]
    state["blocks.9.layer.extra"] = torch.zeros(1)
    save_file(state, str(src / "model.safetensors"))
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "final_norm.weight" in err and "blocks.9.layer.extra" in err and "blocks.1.layer.up_proj.weight" in err


def test_check_state_dict_accepts_tied_head_once(tmp_path):
    src, model = save_tiny(tmp_path, "mamba2")
    config, state, tok = load_model_dir(src)
    assert tok == src
    check_state_dict(config, {k: v for k, v in state.items() if k != "lm_head.weight"})
    try:
        check_state_dict(config, {k: v for k, v in state.items() if k != "embed.weight"})
    except ExportError as exc:
        assert "embed.weight" in str(exc)
    else:
        raise AssertionError("missing embedding was accepted")


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hybrid-lm export: error: ")
    return lines[0]


def test_folder_that_is_not_a_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a checkpoint")
    assert cli_main(["export", str(tmp_path / "notes"), str(tmp_path / "out")]) == 1
    assert "neither a checkpoint" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_a_corrupt_file_is_refused_in_one_line(tmp_path, capsys):
    """The completeness marker is verified before anything is read, so a hand-made step dir with a
    marker exercises the same refusal as a trained one (training one would take seconds)."""
    from hybrid_lm.train.checkpoint import layout

    ckpt = tmp_path / "run" / "checkpoints" / layout.step_dir_name(1)
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
    layout.write_marker(ckpt, {"step": 1, "zero_stage": 0})
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 50)  # truncated after the save
    assert cli_main(["export", str(ckpt), str(tmp_path / "out")]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "mp_rank_00_model_states.pt" in line and "sha256 mismatch" in line
    # a run dir whose only checkpoint is corrupt: the fallback search finds none
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_model_dir_with_a_corrupt_file_is_refused_in_one_line(tmp_path, capsys):
    src, _ = save_tiny(tmp_path, "llama")
    (src / "tokenizer.json").write_text('{"truncated": ')
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 1
    assert "tokenizer.json: cannot load tokenizer" in _one_line_error(capsys.readouterr().err)
    (src / "model.safetensors").write_bytes(b"\x00" * 16)
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 1
    assert "model.safetensors: cannot read" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_model_dir_with_a_broken_json_file_is_refused_in_one_line(tmp_path, capsys):
    src, _ = save_tiny(tmp_path, "llama")
    (src / "model_config.json").write_text('{"d_model": ')
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 1
    assert "model_config.json: not valid JSON" in _one_line_error(capsys.readouterr().err)
    (src / "model_config.json").write_text("[]")
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 1
    assert "model_config.json: expected a JSON object, got a list" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_state_collapse_knobs_export_as_remote_code():
    """HF's Mamba-2 layers have no decay multiplier or state bound: a model that sets one exports as
    remote code (our layer with its config), never as a native class that would silently drop it."""
    from dataclasses import replace

    for name in ("mamba2", "bamba"):
        cfg = tiny_config(name)
        assert select(cfg).name == name
        knobbed = replace(cfg, mamba2=replace(cfg.mamba2, decay_mult=0.9))
        assert select(knobbed).name == "remote"
        try:
            select(knobbed, "native")
            raise AssertionError("native export accepted a knob it cannot hold")
        except ExportError as exc:
            assert "mamba2.decay_mult=0.9" in str(exc)
