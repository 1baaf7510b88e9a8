"""Name mapping between an attention + MLP ``HybridLM`` (pattern ``"A-" * n``) and HF Llama.

Each Llama decoder layer j is our pair of blocks (2j: attention, 2j+1: SwiGLU MLP):

    ours                                HF LlamaForCausalLM
    embed.weight                        model.embed_tokens.weight
    blocks.{2j}.norm.weight             model.layers.{j}.input_layernorm.weight
    blocks.{2j}.layer.{q,k,v,o}_proj.*  model.layers.{j}.self_attn.{q,k,v,o}_proj.*
    blocks.{2j+1}.norm.weight           model.layers.{j}.post_attention_layernorm.weight
    blocks.{2j+1}.layer.{gate,up,down}_proj.weight  model.layers.{j}.mlp.{...}.weight
    final_norm.weight                   model.norm.weight
    lm_head.weight                      lm_head.weight

RoPE uses the same rotate-half convention and ``rope_theta``; sliding windows have no Llama
equivalent, so a windowed config is refused.
"""
from __future__ import annotations

from typing import Any

import torch

from hybrid_lm.models.config import ModelConfig


def _check(config: ModelConfig) -> None:
    if config.layer_pattern != "A-" * (config.n_blocks // 2) or config.n_blocks % 2:
        raise ValueError(f"HF Llama needs layer_pattern 'A-' repeated; got {config.layer_pattern!r}")
    if config.attention.window is not None:
        raise ValueError("HF Llama has no sliding window; attention.window must be None")


def hf_llama_config_kwargs(config: ModelConfig, max_position_embeddings: int = 4096) -> dict[str, Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` describing the same model."""
    _check(config)
    a = config.attention
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.mlp_hidden_size,
        num_hidden_layers=config.n_blocks // 2,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads or a.n_heads,
        head_dim=config.attention_head_dim,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_base},
        attention_bias=a.bias,
        mlp_bias=False,
        tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=None,
    )


def hf_llama_name(name: str) -> str:
    """The HF Llama name of one of our parameter names."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, i, kind, *rest = name.split(".")
    j, is_mlp = divmod(int(i), 2)
    tail = ".".join(rest)
    if kind == "norm":
        return f"model.layers.{j}.{'post_attention_layernorm' if is_mlp else 'input_layernorm'}.{tail}"
    return f"model.layers.{j}.{'mlp' if is_mlp else 'self_attn'}.{tail}"


def to_hf_llama_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ``HybridLM.state_dict()`` -> HF ``LlamaForCausalLM`` state dict (same tensors)."""
    _check(config)
    return {hf_llama_name(k): v for k, v in state_dict.items()}


def from_hf_llama_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig,
                             our_names: list[str]) -> dict[str, torch.Tensor]:
    """HF Llama state dict -> ours, for the parameter names ``our_names`` of the target model."""
    _check(config)
    out = {k: state_dict[hf_llama_name(k)] for k in our_names if hf_llama_name(k) in state_dict}
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    missing = set(our_names) - set(out)
    if missing:
        raise KeyError(f"HF state dict lacks {sorted(missing)}")
    return out
