"""Name mapping between a pure Mamba-2 ``HybridLM`` (pattern ``"M" * n``) and HF ``Mamba2ForCausalLM``.

The seed of the HF export: the parity test loads our weights into transformers' torch path with
these functions and compares logits.

    ours                               HF
    embed.weight                       backbone.embeddings.weight
    blocks.{i}.norm.weight             backbone.layers.{i}.norm.weight
    blocks.{i}.layer.<p>               backbone.layers.{i}.mixer.<p>   (in_proj, conv1d, dt_bias,
                                                                        A_log, D, norm.weight, out_proj)
    final_norm.weight                  backbone.norm_f.weight
    lm_head.weight                     lm_head.weight

Config notes (transformers 5.x): HF's ``n_groups`` defaults to 8 (we pass ours);
``time_step_limit`` (0, inf) means no clamp, as ours; ``use_conv_bias``/``use_bias`` follow our
``conv_bias``/``bias``; ``residual_in_fp32`` only matters below fp32. HF's gated RMSNorm
(``MambaRMSNormGated``) gates before normalising (our ``norm_before_gate=False``) and, in
transformers 5.x, groups the statistic per ``n_groups`` like mamba_ssm (checked at G = 2 in
tests/models/test_mamba2_layer.py); older HF releases normalised over the full width in the torch
path, which disagrees when G > 1, so the stack parity test uses G = 1. HF has no MLP between mixers, hence the pattern restriction.
"""
from __future__ import annotations

from typing import Any

import torch

from hybrid_lm.models.config import ModelConfig


def _check(config: ModelConfig) -> None:
    if set(config.layer_pattern) != {"M"}:
        raise ValueError(f"HF Mamba2 holds only Mamba-2 blocks; layer_pattern is {config.layer_pattern!r}")
    if config.mamba2.norm_before_gate:
        raise ValueError("HF Mamba2 gates before the norm; mamba2.norm_before_gate must be False")


def hf_mamba2_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.Mamba2Config`` describing the same model."""
    _check(config)
    m = config.mamba2
    d_inner = m.expand * config.d_model
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_blocks,
        num_heads=d_inner // m.headdim,
        head_dim=m.headdim,
        state_size=m.d_state,
        expand=m.expand,
        conv_kernel=m.d_conv,
        n_groups=m.ngroups,
        chunk_size=m.chunk_size,
        use_bias=m.bias,
        use_conv_bias=m.conv_bias,
        layer_norm_epsilon=config.norm_eps,
        time_step_min=m.dt_min,
        time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor,
        time_step_limit=(0.0, float("inf")),
        residual_in_fp32=True,
        rms_norm=True,
        tie_word_embeddings=config.tie_embeddings,
        pad_token_id=None,
    )


def hf_mamba2_name(name: str) -> str:
    """The HF Mamba2 name of one of our parameter names."""
    if name == "embed.weight":
        return "backbone.embeddings.weight"
    if name == "final_norm.weight":
        return "backbone.norm_f.weight"
    if name == "lm_head.weight":
        return name
    parts = name.split(".")
    if parts[0] == "blocks":
        i, rest = parts[1], parts[2:]
        if rest[0] == "norm":
            return f"backbone.layers.{i}.norm." + ".".join(rest[1:])
        if rest[0] == "layer":
            return f"backbone.layers.{i}.mixer." + ".".join(rest[1:])
    raise KeyError(f"no HF Mamba2 name for {name!r}")


def to_hf_mamba2_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ``HybridLM.state_dict()`` -> HF ``Mamba2ForCausalLM`` state dict (same tensors)."""
    _check(config)
    return {hf_mamba2_name(k): v for k, v in state_dict.items()}


def from_hf_mamba2_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF ``Mamba2ForCausalLM`` state dict -> ours; a tied HF model may omit ``lm_head.weight``."""
    _check(config)
    inverse = {hf_mamba2_name(k): k for k in _our_names(config)}
    out = {inverse[k]: v for k, v in state_dict.items() if k in inverse}
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    missing = set(inverse.values()) - set(out)
    if missing:
        raise KeyError(f"HF state dict lacks {sorted(missing)}")
    return out


def _our_names(config: ModelConfig) -> list[str]:
    mixer = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"]
    if config.mamba2.conv_bias:
        mixer.append("conv1d.bias")
    if config.mamba2.bias:
        mixer += ["in_proj.bias", "out_proj.bias"]
    names = ["embed.weight", "final_norm.weight", "lm_head.weight"]
    for i in range(config.n_blocks):
        names.append(f"blocks.{i}.norm.weight")
        names += [f"blocks.{i}.layer.{p}" for p in mixer]
    return names
