"""Config of the neural long-term memory layers (Titans MAC/MAG/MAL, ATLAS)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TitansConfig:
    """Neural memory hyperparameters (see spec/02-titans.md, spec/03-miras-atlas.md)."""

    n_heads: int = 4
    """memory heads; each head has its own deep memory over d_model / n_heads channels"""
    memory_depth: int = 2
    """layers of the memory MLP whose weights are the recurrent state"""
    chunk_size: int = 16
    """tokens per parallel chunk (gradients taken at the memory the chunk started with)"""
