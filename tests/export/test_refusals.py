"""``hybrid-lm export`` refuses clearly: a non-empty output folder, an architecture with no mapping
for the requested target, weights that disagree with their config."""
import torch
from export_helpers import save_tiny, tiny_config

from hybrid_lm.cli import main as cli_main
from hybrid_lm.export.adapters import select
from hybrid_lm.export.model_dir import ExportError, check_state_dict, load_model_dir
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
