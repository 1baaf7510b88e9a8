"""Config of the ATLAS memory layers (Omega rule, polynomial features, Muon)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class AtlasConfig:
    """ATLAS-specific settings; heads, depth, chunk size and gates come from ``TitansConfig``."""

    omega_window: int = 4
    """c: the memory objective covers the last c tokens (1 = Titans online rule). The paper does
    not state its value; 4 is our default"""
    poly_degree: int = 2
    """degree of the polynomial feature map of keys/queries (0 disables; paper value not stated)"""
    optimizer: Literal["muon", "momentum"] = "muon"
    """inner optimiser: Newton-Schulz-orthogonalised momentum (Muon) or plain momentum"""
    ns_steps: int = 5
    """Newton-Schulz iterations of the Muon step (5 in practice)"""
