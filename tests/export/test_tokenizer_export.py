"""The tokenizer of an export: an imported Hugging Face tokenizer (``<s>``/``</s>``, Llama 3 names)
survives ``hybrid-lm import`` -> ``hybrid-lm export`` and tokenizes as the source did, a bare
``tokenizer.json`` gets its specials named, and a source without a tokenizer exports with a warning."""
import json

import pytest
import torch
from export_helpers import save_tiny, tiny_config, tiny_model

from hybrid_lm.cli import main as cli_main
from hybrid_lm.models.model_dir import save_model_dir

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tokenizer test",
          "pack my box with five dozen liquor jugs"] * 10
SAMPLE = "the lazy fox says hello</s> to the wörld 42 <|end_of_text|>"


def _bpe(specials: list[str], bos: str):
    """A small byte-level BPE with merges that prepends ``bos``, as Llama-family tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _llama_source(path):
    """Llama 2 conventions: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad in the model config."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = _bpe(["<unk>", "<s>", "</s>", "<pad>"], bos="<s>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}  # pad: from tokenizer_config


def _mamba2_source(path):
    """Llama 3 conventions: ``<|begin_of_text|>``/``<|end_of_text|>``, generate stops at two ids."""
    from transformers import GenerationConfig, Mamba2Config, Mamba2ForCausalLM, PreTrainedTokenizerFast

    tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], bos="<|begin_of_text|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.save_pretrained(str(path))
    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1, num_heads=4,
                          head_dim=16, state_size=8, expand=2, n_groups=1, chunk_size=8, tie_word_embeddings=True,
                          bos_token_id=0, eos_token_id=1, pad_token_id=None)
    Mamba2ForCausalLM(config).save_pretrained(str(path))
    GenerationConfig(bos_token_id=0, eos_token_id=[1, 2]).save_pretrained(str(path))
    return {"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": None}


@pytest.mark.parametrize("make", [_llama_source, _mamba2_source], ids=["llama", "mamba2"])
def test_imported_hf_tokenizer_round_trips_through_export(tmp_path, make):
    from transformers import AutoTokenizer

    expected_ids = make(tmp_path / "hf")
    assert cli_main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0

    source, back = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(tmp_path / "back")
    ids = back(SAMPLE).input_ids
    assert ids == source(SAMPLE).input_ids
    assert ids[0] == source.bos_token_id and len(ids) < len(SAMPLE.encode())  # bos prepended, merges used
    assert back.decode(ids, skip_special_tokens=True) == source.decode(ids, skip_special_tokens=True)
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(back, name) == getattr(source, name), name
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    for key, value in expected_ids.items():
        assert generation.get(key) == value, key
        assert config.get(key) == value, key
    assert json.loads((tmp_path / "back" / "hybrid_lm_export.json").read_text())["tokenizer"] == "hf"


def _bare_tokenizer_dir(path):
    path.mkdir()
    _bpe(["<unk>", "<s>", "</s>"], bos="<s>").save(str(path / "tokenizer.json"))
    return path


def test_bare_foreign_tokenizer_json_gets_its_specials_named(tmp_path, capsys):
    """A model dir holding only a foreign tokenizer.json (imported before ids were recorded)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok_dir = _bare_tokenizer_dir(tmp_path / "tok")
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    config = tiny_config("llama", vocab_size=vocab)
    save_model_dir(tmp_path / "src", config, tiny_model(config).state_dict(), tok_dir)
    assert cli_main(["export", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "taken by their usual names: bos=<s>, eos=</s>" in capsys.readouterr().err
    back = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (back.bos_token, back.eos_token, back.bos_token_id, back.eos_token_id) == ("<s>", "</s>", 1, 2)
    reference = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert back(SAMPLE).input_ids == reference.encode(SAMPLE).ids
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_export_without_tokenizer_warns_and_says_so(tmp_path, capsys):
    config = tiny_config("llama")
    save_model_dir(tmp_path / "src", config, tiny_model(config).state_dict())  # no tokenizer
    assert cli_main(["export", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "[export] warning:" in captured.err and "carries no tokenizer.json" in captured.err
    assert "AutoTokenizer.from_pretrained" in captured.err
    assert "tokenizer: NO TOKENIZER" in captured.out
    assert json.loads((tmp_path / "out" / "hybrid_lm_export.json").read_text())["tokenizer"] is None
    assert not list((tmp_path / "out").glob("tokenizer*"))
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the weights still export


def test_export_with_the_runs_tokenizer_stays_quiet(tmp_path, capsys):
    src, _ = save_tiny(tmp_path, "llama")
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "tokenizer: the run's tokenizer" in captured.out
