"""``hybrid-lm import`` then ``hybrid-lm export`` gives back the very tensors of an HF model, and both
directions refuse what they cannot represent with a message naming the problem."""
import json

import pytest
import torch
from safetensors.torch import load_file

from hybrid_lm.cli import main as cli_main
from hybrid_lm.models.model_dir import load_model_dir


def _hf_llama(path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides}))
    model.save_pretrained(str(path))
    return model


def _hf_mamba2(path):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                       expand=2, n_groups=1, chunk_size=8, tie_word_embeddings=True)
    model = Mamba2ForCausalLM(cfg)
    model.save_pretrained(str(path))
    return model


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("make", [_hf_llama, _hf_mamba2], ids=["llama", "mamba2"])
def test_import_then_export_gives_identical_tensors(tmp_path, make):
    from transformers import AutoModelForCausalLM

    hf = make(tmp_path / "hf")
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    config, state, _ = load_model_dir(tmp_path / "ours")
    assert cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    # and our model built from the import computes what the HF model computes
    from hybrid_lm.models.hybrid import HybridLM

    ours = HybridLM(config).eval()
    ours.load_state_dict(state)
    x = torch.randint(0, 258, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf.eval()(x).logits, rtol=0, atol=1e-5)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "back")).__name__ == type(hf).__name__


def test_import_refuses_rope_scaling(tmp_path, capsys):
    _hf_llama(tmp_path / "hf", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 1
    assert "rope scaling" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


def test_import_refuses_mlp_bias_and_unknown_model_type(tmp_path, capsys):
    _hf_llama(tmp_path / "hf", mlp_bias=True)
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 1
    assert "mlp_bias" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 1
    assert "cannot import model_type 'gpt2'" in capsys.readouterr().err


def test_import_refuses_a_config_transformers_rejects_in_one_line(tmp_path, capsys):
    _hf_llama(tmp_path / "hf")
    capsys.readouterr()  # the source's own save progress bar
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["hidden_size"] = cfg["num_attention_heads"] * 3 + 1  # not a multiple of the heads
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hybrid-lm import: error: ") and "config.json: transformers rejects it" in err
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama",')
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 1
    assert capsys.readouterr().err.startswith("hybrid-lm import: error: ")
    assert not (tmp_path / "ours").exists()


def test_import_refuses_tensors_that_disagree_with_config(tmp_path, capsys):
    from safetensors.torch import save_file

    _hf_llama(tmp_path / "hf")
    state = _tensors(tmp_path / "hf")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(50, 32)
    del state["model.layers.0.self_attn.o_proj.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 1
    err = capsys.readouterr().err
    assert "blocks.0.layer.o_proj.weight" in err and "blocks.3.layer.up_proj.weight" in err


def test_import_without_out_dir_writes_into_the_working_directory(tmp_path, monkeypatch, capsys):
    from hybrid_lm.export.import_cli import default_out_dir

    _hf_llama(tmp_path / "models" / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["import", str(tmp_path / "models" / "tiny-llama")]) == 0
    assert "-> tiny-llama-hybrid-lm" in capsys.readouterr().out
    load_model_dir(tmp_path / "tiny-llama-hybrid-lm")
    assert not (tmp_path / "models" / "tiny-llama-hybrid-lm").exists()  # never beside the source
    # a second run refuses to overwrite it, as with an explicit OUT_DIR
    assert cli_main(["import", str(tmp_path / "models" / "tiny-llama")]) == 1
    assert "not empty" in capsys.readouterr().err
    # a Hub cache snapshot is named by its repo, not its commit hash
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "0123abcd"
    assert default_out_dir(snapshot) == default_out_dir(tmp_path / "models" / "tiny-llama")


def _one_line_import_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hybrid-lm import: error: "), lines[0]
    return lines[0]


def _with_tokenizer_config(text):
    def damage(hf):
        from hybrid_lm.data.tokenizer import Tokenizer

        Tokenizer.from_spec("byte").save(hf)
        (hf / "tokenizer_config.json").write_text(text)

    return damage


@pytest.mark.parametrize("damage, expect", [
    (lambda hf: (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:5000]),
     "model.safetensors: cannot read"),
    (lambda hf: (hf / "model.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator()
                                                                      .manual_seed(0)).to(torch.uint8).numpy().tobytes()),
     "model.safetensors: cannot read"),
    (lambda hf: (hf / "config.json").write_text("[1, 2, 3]"), "config.json: expected a JSON object, got a list"),
    (lambda hf: (hf / "config.json").write_text('{"model_type": "llama",'), "config.json: not valid JSON"),
    (lambda hf: (hf / "model.safetensors.index.json").write_text('{"weight_map": '),
     "model.safetensors.index.json: not valid JSON"),
    (lambda hf: (hf / "model.safetensors.index.json").write_text('["model.safetensors"]'),
     "model.safetensors.index.json: expected a JSON object"),
    (lambda hf: (hf / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "gone.safetensors"}}'),
     "gone.safetensors: named by"),
    (lambda hf: (hf / "generation_config.json").write_text("[]"), "generation_config.json: expected a JSON object"),
    (_with_tokenizer_config("{"), "tokenizer_config.json: not valid JSON"),
], ids=["truncated-weights", "random-weights", "config-list", "config-broken", "index-broken", "index-list",
        "index-missing-shard", "generation-config-list", "tokenizer-config-broken"])
def test_import_of_a_damaged_source_is_one_line_naming_the_file(tmp_path, capsys, damage, expect):
    hf = tmp_path / "hf"
    _hf_llama(hf)
    damage(hf)
    capsys.readouterr()
    assert cli_main(["import", str(hf), str(tmp_path / "ours")]) == 1
    line = _one_line_import_error(capsys.readouterr().err)
    assert expect in line and str(hf) in line, line
    assert not (tmp_path / "ours").exists()
