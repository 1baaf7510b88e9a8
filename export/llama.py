"""Pure attention stacks (pattern ``A-`` repeated) <-> transformers ``LlamaForCausalLM``.

Our attention block + SwiGLU block pair is exactly one Llama decoder layer: RMSNorm, GQA attention
with rotate-half RoPE (``models/attention/rope.py`` follows HF's convention), residual, RMSNorm,
SwiGLU (``gate_proj/up_proj/down_proj``), residual. Not representable, hence refused: a sliding
window (Llama attends to the full prefix). Import refuses what our attention lacks: RoPE scaling,
partial rotary, a bias on some projections but not others, MLP bias, non-SiLU activations.

    ours                                   HF Llama (layer i = blocks 2i, 2i+1)
    embed.weight                           model.embed_tokens.weight
    blocks.{2i}.norm.weight                model.layers.{i}.input_layernorm.weight
    blocks.{2i}.layer.{q,k,v,o}_proj.*     model.layers.{i}.self_attn.{q,k,v,o}_proj.*
    blocks.{2i+1}.norm.weight              model.layers.{i}.post_attention_layernorm.weight
    blocks.{2i+1}.layer.{gate,up,down}_proj.weight   model.layers.{i}.mlp.*
    final_norm.weight                      model.norm.weight
    lm_head.weight                         lm_head.weight
"""
from __future__ import annotations

from typing import Optional

import torch

from hybrid_lm.export.native import NativeAdapter
from hybrid_lm.models.attention.hf_mapping import hf_llama_config_kwargs, hf_llama_name, to_hf_llama_state_dict
from hybrid_lm.models.config import AttentionConfig, MLPConfig, ModelConfig
from hybrid_lm.models.model_dir import ExportError, SpecialIds, expected_shapes


class LlamaAdapter(NativeAdapter):
    name = "llama"
    hf_class = "LlamaForCausalLM"

    def unsupported(self, config: ModelConfig) -> Optional[str]:
        p = config.layer_pattern
        if len(p) % 2 or p != "A-" * (len(p) // 2):
            return f"Llama needs pattern 'A-' repeated, got {p!r}"
        if config.attention.window is not None:
            return f"Llama has no sliding window (attention.window={config.attention.window})"
        return None

    def hf_config(self, config: ModelConfig, special_ids: SpecialIds):
        from transformers import LlamaConfig

        return LlamaConfig(**{**hf_llama_config_kwargs(config), "hidden_act": "silu",
                              "initializer_range": config.init_std, **special_ids})

    def to_hf(self, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_hf_llama_state_dict(state_dict, config)

    def from_hf_config(self, hf: dict) -> ModelConfig:
        """Our config for an HF Llama ``config.json`` dict; refuses features we do not have."""
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if hf.get("rope_scaling") or rope_type != "default":
            raise ExportError(f"Llama with rope scaling ({hf.get('rope_scaling') or rope}) has no hybrid-lm equivalent")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ExportError("Llama with partial rotary embeddings has no hybrid-lm equivalent")
        if hf.get("mlp_bias"):
            raise ExportError("Llama with mlp_bias=true has no hybrid-lm equivalent (our SwiGLU has no bias)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ExportError(f"Llama with hidden_act={hf['hidden_act']!r}: our MLP is SwiGLU (silu)")
        heads = hf["num_attention_heads"]
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], layer_pattern="A-" * hf["num_hidden_layers"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
            attention=AttentionConfig(n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                                      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                                      rope_base=float(theta), bias=bool(hf.get("attention_bias", False))),
            mlp=MLPConfig(hidden_size=hf["intermediate_size"]))

    def from_hf(self, config: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inverse = {hf_llama_name(k): k for k in expected_shapes(config)}
        unknown = sorted(k for k in hf_state if k not in inverse and "rotary_emb" not in k)
        if unknown:
            raise ExportError(f"Llama checkpoint has tensors with no hybrid-lm counterpart: {unknown[:8]}")
        return {inverse[k]: v for k, v in hf_state.items() if k in inverse}
