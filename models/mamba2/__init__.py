"""Mamba-2 (SSD) mixer: layer letter ``M``. Kernels live in ``hybrid_lm.kernels.ssd``."""
from hybrid_lm.models.common.registry import register_layer
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.mamba2.layer import Mamba2
from hybrid_lm.models.mamba2.norm import GatedRMSNorm


@register_layer("M", "mamba2", "Mamba-2 selective state space mixer (chunked SSD)")
def build_mamba2(config: ModelConfig, layer_index: int) -> Mamba2:
    m = config.mamba2
    return Mamba2(
        config.d_model,
        d_state=m.d_state,
        d_conv=m.d_conv,
        expand=m.expand,
        headdim=m.headdim,
        ngroups=m.ngroups,
        chunk_size=m.chunk_size,
        dt_min=m.dt_min,
        dt_max=m.dt_max,
        dt_init_floor=m.dt_init_floor,
        A_init_range=m.A_init_range,
        conv_bias=m.conv_bias,
        bias=m.bias,
        norm_before_gate=m.norm_before_gate,
        norm_eps=config.norm_eps,
        backend=m.backend,
        dt_mult=m.dt_mult,
        a_mult=m.a_mult,
        decay_mult=m.decay_mult,
        b_mult=m.b_mult,
        state_norm_max=m.state_norm_max,
        state_window=m.state_window,
    )


__all__ = ["Mamba2", "GatedRMSNorm", "build_mamba2"]
