"""ATLAS kernels: the Newton-Schulz (Muon) orthogonalisation of the memory's momentum.

The chunked Omega-rule update itself is shared with Titans (``hybrid_lm.kernels.titans``), which
takes a window of keys/values per token and a Newton-Schulz step count.
"""
from hybrid_lm.kernels.atlas.newton_schulz import NS5_COEFFS, newton_schulz

__all__ = ["NS5_COEFFS", "newton_schulz"]
