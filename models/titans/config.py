"""Config of the neural long-term memory layers (Titans LMM/MAC/MAG/MAL; ATLAS reuses the memory
fields and adds its own section in ``models/atlas/config.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TitansConfig:
    """Neural memory hyperparameters (see spec/02-titans.md, spec/03-miras-atlas.md).

    Values the paper leaves open are marked; defaults then follow lucidrains' titans-pytorch.
    """

    n_heads: int = 4
    """memory heads; each head has its own deep memory over d_model / n_heads channels
    (also the head count of the attention inside MAC/MAG/MAL)"""
    memory_depth: int = 2
    """layers of the memory MLP whose weights are the recurrent state"""
    memory_expansion: int = 4
    """hidden width of the memory MLP = expansion * head_dim (lucidrains NeuralMemory default)"""
    memory_residual: bool = True
    """M(x) = x + MLP(x) (Miras/ATLAS form) when input and output dims match"""
    chunk_size: int = 16
    """tokens per parallel chunk (gradients taken at the memory the chunk started with)"""
    conv_size: int = 4
    """depthwise causal conv on q/k/v (kernel 4 per Miras/ATLAS); 0 disables"""
    theta_max: float = 1.0
    """inner learning rate theta_t = theta_max * sigmoid(.) (lucidrains module default)"""
    theta_bias_init: float = 0.0
    """initial bias of the learning-rate gate: theta = theta_max / 2 at init"""
    momentum_bias_init: float = 0.0
    """initial bias of the momentum gate: eta = 0.5 at init (paper silent)"""
    decay_bias_init: float = -4.0
    """initial bias of the forget gate: alpha ~ 0.018 at init, i.e. slow forgetting (paper silent)"""
    n_persistent: int = 4
    """learned persistent key/value pairs prepended to the attention of MAC/MAG/MAL (lucidrains: 4)"""
    window: int = 32
    """sliding-window size of the attention branch in MAG/MAL (lucidrains train_mac: 32)"""
    segment_len: int = 32
    """MAC segment length; must be a multiple of chunk_size"""
    rope_base: float = 10000.0
    """RoPE base of the attention inside MAC/MAG/MAL"""
    head_dim: Optional[int] = None
    """channels per memory head; None means d_model // n_heads"""
