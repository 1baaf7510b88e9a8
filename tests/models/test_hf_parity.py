"""Peer parity: our stacks loaded into transformers' Mamba2 and Llama give the same logits (CPU, fp32)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hybrid_lm.models.config import AttentionConfig, Mamba2Config, ModelConfig  # noqa: E402
from hybrid_lm.models.hybrid import HybridLM  # noqa: E402
from hybrid_lm.models.attention.hf_mapping import (  # noqa: E402
    from_hf_llama_state_dict, hf_llama_config_kwargs, to_hf_llama_state_dict)
from hybrid_lm.models.mamba2.hf_mapping import (  # noqa: E402
    from_hf_mamba2_state_dict, hf_mamba2_config_kwargs, to_hf_mamba2_state_dict)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mamba2_matches_transformers(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, layer_pattern="MMMM", tie_embeddings=tie,
                      mamba2=Mamba2Config(d_state=16, headdim=8, ngroups=1, chunk_size=8, backend="torch"))
    ours = HybridLM(cfg).eval()
    with torch.no_grad():  # non-trivial A/D so a swapped parameter cannot hide
        for block in ours.blocks:
            block.layer.D.uniform_(0.5, 1.5)
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**hf_mamba2_config_kwargs(cfg))).eval()
    hf.load_state_dict(to_hf_mamba2_state_dict(ours.state_dict(), cfg), strict=True)
    ids = torch.randint(0, 64, (2, 21))  # 21 is not a multiple of the chunk
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-4, atol=1e-4)
    back = from_hf_mamba2_state_dict(hf.state_dict(), cfg)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_attention_mlp_matches_llama(kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, layer_pattern="A-A-",
                      attention=AttentionConfig(n_heads=4, n_kv_heads=kv_heads, rope_base=500.0))
    ours = HybridLM(cfg).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config_kwargs(cfg))).eval()
    hf.load_state_dict(to_hf_llama_state_dict(ours.state_dict(), cfg), strict=True)
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    back = from_hf_llama_state_dict(hf.state_dict(), cfg, list(ours.state_dict()))
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_mapping_refuses_other_patterns():
    cfg = ModelConfig(vocab_size=64, d_model=32, layer_pattern="MA-")
    with pytest.raises(ValueError, match="layer_pattern"):
        hf_mamba2_config_kwargs(cfg)
    with pytest.raises(ValueError, match="layer_pattern"):
        hf_llama_config_kwargs(cfg)
