"""Mamba-2 + attention hybrids whose every mixer is followed by an MLP <-> ``BambaForCausalLM``.

Why Bamba and not NemotronH (checked against transformers 5.x source):

* NemotronH's attention applies **no RoPE** (``NemotronHAttention.forward`` never touches position
  embeddings) and its MLP is **not gated** (``down(act(up(x)))``, relu2 by default). Our attention
  uses RoPE and our MLP is SwiGLU, so NemotronH cannot give our logits.
* Bamba's decoder layer is exactly our pair of blocks (mixer, ``-``): RMSNorm, Mamba-2 or attention,
  residual, RMSNorm, SwiGLU, residual. Its attention uses rotate-half RoPE; the config hardcodes
  ``partial_rotary_factor=0.5`` only when ``rope_parameters`` does not set it, so we pass 1.0.
  Its Mamba-2 gated RMSNorm is grouped (``group_size = d_inner / n_groups``), like ours.

So patterns of (``M`` or ``A``) each followed by ``-`` map to Bamba (``attn_layer_indices`` lists the
attention layers); anything else (two mixers in a row, a window, other letters) goes to remote code.

    ours (layer i = blocks 2i, 2i+1)     HF Bamba
    blocks.{2i}.norm.weight              model.layers.{i}.input_layernorm.weight
    blocks.{2i}.layer.*  (M / A)         model.layers.{i}.mamba.* / model.layers.{i}.self_attn.*
    blocks.{2i+1}.norm.weight            model.layers.{i}.pre_ff_layernorm.weight
    blocks.{2i+1}.layer.*                model.layers.{i}.feed_forward.*
    embed / final_norm / lm_head         model.embed_tokens / model.final_layernorm / lm_head
"""
from __future__ import annotations

from typing import Optional

import torch

from hybrid_lm.export.mamba2 import long_context_knobs
from hybrid_lm.export.native import NativeAdapter
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.model_dir import SpecialIds


def _rename(config: ModelConfig, name: str) -> str:
    fixed = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.final_layernorm.weight",
             "lm_head.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, block, part, *rest = name.split(".")
    i, second = divmod(int(block), 2)
    if part == "norm":
        return f"model.layers.{i}.{'pre_ff_layernorm' if second else 'input_layernorm'}.{'.'.join(rest)}"
    if second:
        module = "feed_forward"
    else:
        module = "mamba" if config.layer_pattern[int(block)] == "M" else "self_attn"
    return f"model.layers.{i}.{module}.{'.'.join(rest)}"


class BambaAdapter(NativeAdapter):
    name = "bamba"
    hf_class = "BambaForCausalLM"

    def unsupported(self, config: ModelConfig) -> Optional[str]:
        p = config.layer_pattern
        mixers, mlps = p[0::2], p[1::2]
        if len(p) % 2 or set(mlps) != {"-"} or not set(mixers) <= {"M", "A"}:
            return f"Bamba needs (M or A) each followed by '-', got {p!r}"
        if "A" in p and config.attention.window is not None:
            return f"Bamba attention has no sliding window (attention.window={config.attention.window})"
        if "M" in p and config.mamba2.norm_before_gate:
            return "Bamba gates before its Mamba norm (mamba2.norm_before_gate must be false)"
        return long_context_knobs(config)

    def hf_config(self, config: ModelConfig, special_ids: SpecialIds):
        from transformers import BambaConfig

        a, m = config.attention, config.mamba2
        d_inner = m.expand * config.d_model
        hf = BambaConfig(
            vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_hidden_size,
            num_hidden_layers=config.n_blocks // 2, num_attention_heads=a.n_heads,
            num_key_value_heads=a.n_kv_heads or a.n_heads, hidden_act="silu", rms_norm_eps=config.norm_eps,
            attn_layer_indices=[i // 2 for i, c in enumerate(config.layer_pattern) if c == "A"],
            mamba_n_heads=d_inner // m.headdim, mamba_d_head=m.headdim, mamba_n_groups=m.ngroups,
            mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_chunk_size=m.chunk_size,
            mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.bias, time_step_limit=(0.0, float("inf")),
            rope_parameters={"rope_type": "default", "rope_theta": a.rope_base, "partial_rotary_factor": 1.0},
            attention_bias=a.bias, mlp_bias=False, tie_word_embeddings=config.tie_embeddings,
            initializer_range=config.init_std, **special_ids)
        # BambaAttention reads head_dim with getattr(..., hidden/heads); set it for non-default head dims
        hf.head_dim = config.attention_head_dim
        return hf

    def to_hf(self, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {_rename(config, k): v for k, v in state_dict.items()}
