"""Exports load with ``AutoModelForCausalLM`` and give our logits and our greedy tokens.

One case per export target: Llama (``A-A-``), Mamba2 (``MM``), Bamba (``M-A-``) and remote code
(a Titans MAG hybrid, and a sliding-window hybrid no native class represents). fp32 logits agree to
1e-5: the native classes run the same ops in the same order up to fused-vs-unfused RMSNorm and
SDPA-vs-matmul attention (differences ~1e-7); remote code runs our own source, so it is exact.
"""
import json

import pytest
import torch
from export_helpers import CASES, SMALL, prompt, save_tiny

from hybrid_lm.export.api import export_checkpoint

EXPECTED_CLASS = {"llama": "LlamaForCausalLM", "mamba2": "Mamba2ForCausalLM", "bamba": "BambaForCausalLM",
                  "remote_titans": "HybridLMForCausalLM", "remote_window": "HybridLMForCausalLM",
                  "remote_atlas": "HybridLMForCausalLM", "remote_recursive": "HybridLMForCausalLM",
                  "remote_hmt": "HybridLMForCausalLM", "remote_mamba_window": "HybridLMForCausalLM"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_matches_logits_and_greedy_tokens(tmp_path, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, model = save_tiny(tmp_path, case)
    out = export_checkpoint(src, tmp_path / "hf")
    remote = case.startswith("remote")
    if remote:
        # a remote-code folder must not load without the explicit opt-in
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    assert type(hf).__name__ == EXPECTED_CLASS[case]
    x = prompt()
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    ours_tokens = model.generate(x[:1], 20)
    theirs_tokens = hf.generate(x[:1], do_sample=False, max_new_tokens=20, attention_mask=torch.ones_like(x[:1]))
    assert theirs_tokens.tolist() == ours_tokens.tolist()

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == 256 and tok.pad_token_id == 257
    assert tok("hi")["input_ids"] == [104, 105]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 256 and gen["pad_token_id"] == 257


def test_two_remote_exports_with_different_families_load_in_one_process(tmp_path):
    """transformers caches one config class per configuration file and reuses the model class
    registered for it; the second folder (its own layer letters) must still run its own code."""
    from transformers import AutoModelForCausalLM

    for case in ("remote_atlas", "remote_window"):  # X/D/A, then M/A: the first lacks Mamba-2
        src, model = save_tiny(tmp_path / case, case)
        out = export_checkpoint(src, tmp_path / case / "hf")
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(prompt()).logits, model(prompt()).logits, rtol=0, atol=1e-5)


def test_remote_export_does_not_carry_forced_kernels(tmp_path):
    """A backend forced for training (flash-attn, mamba_ssm kernels) belongs to that machine: the
    export records ``auto``, so the folder runs where those kernels are not installed."""
    from transformers import AutoModelForCausalLM

    src, model = save_tiny(tmp_path, "remote_window", attention={"n_heads": 4, "n_kv_heads": 2, "window": 6,
                                                                 "backend": "flash"},
                           mamba2={**SMALL["mamba2"], "backend": "mamba_ssm"})
    out = export_checkpoint(src, tmp_path / "hf")
    recorded = json.loads((out / "config.json").read_text())["hybrid_lm"]
    assert recorded["attention"]["backend"] == recorded["mamba2"]["backend"] == "auto"
    assert recorded["attention"]["window"] == 6  # the rest of the section is the model's
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    model.config.attention.backend, model.config.mamba2.backend = "auto", "auto"
    ours = type(model)(model.config).eval()
    ours.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(hf(prompt()).logits, ours(prompt()).logits, rtol=0, atol=1e-5)


def test_bfloat16_export_and_shards(tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = save_tiny(tmp_path, "llama")
    out = export_checkpoint(src, tmp_path / "hf", dtype="bfloat16", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(hf.model.embed_tokens.weight.float(),
                               model.embed.weight.detach().to(torch.bfloat16).float(), rtol=0, atol=0)


def test_remote_export_shards(tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = save_tiny(tmp_path, "remote_window")
    out = export_checkpoint(src, tmp_path / "hf", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = prompt()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=0, atol=0)


def test_remote_left_padding_equals_unpadded(tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = save_tiny(tmp_path, "remote_titans")
    hf = AutoModelForCausalLM.from_pretrained(export_checkpoint(src, tmp_path / "hf"), trust_remote_code=True).eval()
    x = prompt(batch=1, length=9)
    padded = torch.cat([torch.full((1, 3), 257), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(x)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(padded, attention_mask=mask).logits[:, 3:], model(x).logits, rtol=0, atol=1e-5)
