"""Pure Mamba-2 stacks (pattern ``M`` repeated) <-> transformers ``Mamba2ForCausalLM``.

Names and config kwargs come from ``models/mamba2/hf_mapping.py`` (the family's own parity
mapping), so there is one copy of them. HF Mamba2 has no MLP between mixers and gates before its
grouped RMSNorm, hence the pattern restriction and ``norm_before_gate=False``. Import adds the
reverse config translation and refuses what our mixer lacks (non-RMS norm, other activations,
a time-step clamp).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from hybrid_lm.export.native import NativeAdapter
from hybrid_lm.models.config import Mamba2Config, ModelConfig
from hybrid_lm.models.mamba2 import hf_mapping
from hybrid_lm.models.model_dir import ExportError, SpecialIds


def long_context_knobs(config: ModelConfig) -> Optional[str]:
    """Why a native class cannot hold this config's state-collapse knobs (None: all neutral). HF's
    Mamba-2 layers have no such settings, so a model that uses them exports as remote code, which
    runs our layer with its config."""
    m = config.mamba2
    if "M" not in config.block_pattern:
        return None
    used = [f"mamba2.{k}={getattr(m, k)}" for k in ("dt_mult", "a_mult", "decay_mult", "b_mult") if getattr(m, k) != 1.0]
    used += [f"mamba2.{k}={getattr(m, k)}" for k in ("state_norm_max", "state_window") if getattr(m, k) is not None]
    return f"transformers' Mamba-2 layers have no state-collapse knobs ({', '.join(used)})" if used else None


class Mamba2Adapter(NativeAdapter):
    name = "mamba2"
    hf_class = "Mamba2ForCausalLM"

    def unsupported(self, config: ModelConfig) -> Optional[str]:
        if set(config.layer_pattern) != {"M"}:
            return f"Mamba2 holds only Mamba-2 blocks, got pattern {config.layer_pattern!r}"
        if config.mamba2.norm_before_gate:
            return "HF Mamba2 gates before its norm (mamba2.norm_before_gate must be false)"
        return long_context_knobs(config)

    def hf_config(self, config: ModelConfig, special_ids: SpecialIds):
        from transformers import Mamba2Config as HFMamba2Config

        kwargs = {**hf_mapping.hf_mamba2_config_kwargs(config), **special_ids, "initializer_range": config.init_std}
        return HFMamba2Config(**kwargs)

    def to_hf(self, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return hf_mapping.to_hf_mamba2_state_dict(state_dict, config)

    def from_hf_config(self, hf: dict) -> ModelConfig:
        if not hf.get("rms_norm", True):
            raise ExportError("Mamba2 with rms_norm=false has no hybrid-lm equivalent")
        if hf.get("hidden_act", "silu") != "silu":
            raise ExportError(f"Mamba2 with hidden_act={hf['hidden_act']!r}: our mixer uses silu")
        limit = tuple(hf.get("time_step_limit", (0.0, math.inf)))
        if limit[0] > 0.0 or limit[1] != math.inf:
            raise ExportError(f"Mamba2 with time_step_limit={list(limit)}: our mixer does not clamp dt")
        d_inner = hf["expand"] * hf["hidden_size"]
        if hf["num_heads"] * hf["head_dim"] != d_inner:
            raise ExportError(f"Mamba2 num_heads*head_dim={hf['num_heads'] * hf['head_dim']} != expand*hidden_size={d_inner}")
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], layer_pattern="M" * hf["num_hidden_layers"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=hf.get("initializer_range", 0.1),
            mamba2=Mamba2Config(d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=hf["expand"],
                                headdim=hf["head_dim"], ngroups=hf["n_groups"], chunk_size=hf["chunk_size"],
                                dt_min=hf["time_step_min"], dt_max=hf["time_step_max"],
                                dt_init_floor=hf["time_step_floor"], conv_bias=bool(hf["use_conv_bias"]),
                                bias=bool(hf["use_bias"])))

    def from_hf(self, config: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            out = hf_mapping.from_hf_mamba2_state_dict(hf_state, config)
        except KeyError as exc:
            raise ExportError(f"Mamba2 checkpoint: {exc}") from exc
        known = {hf_mapping.hf_mamba2_name(k) for k in out}
        unknown = sorted(set(hf_state) - known)
        if unknown:
            raise ExportError(f"Mamba2 checkpoint has tensors with no hybrid-lm counterpart: {unknown[:8]}")
        return out
