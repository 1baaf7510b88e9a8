"""ATLAS layer types: ``X`` (ATLAS memory layer) and ``D`` (DeepTransformer-style memory layer).

Both are the Titans memory layer (``models/titans/memory.py``) with ATLAS options, used as the
sequence mixer in place of attention (spec 3.3):

* ``X`` ATLAS: Omega rule over the last ``atlas.omega_window`` tokens with per-token gates gamma,
  polynomial features of degree ``atlas.poly_degree`` on keys and queries, and Muon
  (Newton-Schulz-``ns_steps`` orthogonalised momentum, step size outside) or plain momentum
  (``atlas.optimizer``); l2 attentional bias ``||M(phi(k)) - v||^2``.
* ``D`` DeepTransformer: Hebbian (dot-product) attentional bias ``-<M(phi(k)), v>`` with a deep
  memory; the polynomial map (Taylor coefficients 1/i!) is the finite-degree stand-in for the
  exponential feature map that makes a linear memory equal unnormalised softmax attention.
  With ``omega_window > 1`` it is the paper's sliding-window (Dot / SWDT) form. Plain momentum.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_lm.models.common.registry import register_layer
from hybrid_lm.models.titans.layers import memory_spec
from hybrid_lm.models.titans.memory import MemorySpec, NeuralMemory

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig


def atlas_spec(config: "ModelConfig", **overrides: object) -> MemorySpec:
    a = config.atlas
    if a.omega_window < 1:
        raise ValueError(f"ModelConfig.atlas.omega_window: must be >= 1, got {a.omega_window}")
    if a.poly_degree < 0:
        raise ValueError(f"ModelConfig.atlas.poly_degree: must be >= 0, got {a.poly_degree}")
    if a.optimizer not in ("muon", "momentum"):
        raise ValueError(f"ModelConfig.atlas.optimizer: 'muon' or 'momentum', got {a.optimizer!r}")
    kw: dict[str, object] = dict(
        omega_window=a.omega_window, poly_degree=a.poly_degree,
        ns_steps=a.ns_steps if a.optimizer == "muon" else 0,
    )
    kw.update(overrides)
    return memory_spec(config, **kw)


@register_layer("X", "atlas", "ATLAS memory layer: Omega rule, polynomial features, Muon inner optimiser")
def build_atlas(config: "ModelConfig", layer_index: int) -> NeuralMemory:
    return NeuralMemory(atlas_spec(config))


@register_layer("D", "deep_transformer", "DeepTransformer: deep memory with Hebbian (dot-product) bias replacing attention")
def build_deep_transformer(config: "ModelConfig", layer_index: int) -> NeuralMemory:
    return NeuralMemory(atlas_spec(config, bias="dot", ns_steps=0))
