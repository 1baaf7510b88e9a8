"""Titans neural long-term memory family: layer letters T (LMM), C (MAC), G (MAG), L (MAL).

Importing the package registers the letters (see README.md in this folder).
"""
from hybrid_lm.models.titans import layers as _layers  # noqa: F401  (registers T, G, L)
from hybrid_lm.models.titans import mac as _mac  # noqa: F401  (registers C)
from hybrid_lm.models.titans.memory import MemorySpec, NeuralMemory

__all__ = ["MemorySpec", "NeuralMemory"]
