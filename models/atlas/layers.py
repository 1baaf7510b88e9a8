"""ATLAS layer types: ``X`` (ATLAS memory layer) and ``D`` (DeepTransformer-style memory layer).

Both are the Titans memory layer (``models/titans/memory.py``) with ATLAS options, used as the
sequence mixer in place of attention (ATLAS paper: Atlas and DeepTransformers). Each reads its own
config section, so a stack can hold both with different settings:

* ``X`` ATLAS (``atlas.*``): Omega rule over the last ``omega_window`` tokens with per-token gates
  gamma, polynomial features of degree ``poly_degree`` on keys and queries, and Muon
  (Newton-Schulz-``ns_steps`` orthogonalised momentum, step size outside) or plain momentum
  (``optimizer``); l2 attentional bias ``||M(phi(k)) - v||^2``; Titans momentum and forget gates.
* ``D`` DeepTransformer (``atlas.deep_transformer.*``): Hebbian (dot-product) attentional bias
  ``-<M(phi(k)), v>`` with a deep memory, plain gradient steps, no momentum and no forgetting by
  default, so that a linear memory is exactly unnormalised kernel attention
  ``y_t = W_0 phi(q_t) + sum_{i<=t} theta_i v_i (phi(k_i) . phi(q_t))``. The polynomial map
  (Taylor coefficients 1/i!) is the finite-degree stand-in for the exponential feature map that
  makes the kernel exp(q.k) (unnormalised softmax attention). The per-token write strength
  theta_i is the layer's learning-rate gate (the paper's DeepTransformer has theta = 1; the gate
  generalises it). ``omega_window > 1`` gives the paper's sliding-window (SWDT) form.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

from hybrid_lm.models.atlas.config import AtlasConfig, DeepTransformerConfig
from hybrid_lm.models.common.registry import register_layer
from hybrid_lm.models.titans.layers import memory_spec
from hybrid_lm.models.titans.memory import MemorySpec, NeuralMemory

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig


def _check_common(section: Union[AtlasConfig, DeepTransformerConfig], where: str) -> None:
    if section.omega_window < 1:
        raise ValueError(f"ModelConfig.{where}.omega_window: must be >= 1, got {section.omega_window}")
    if section.poly_degree < 0:
        raise ValueError(f"ModelConfig.{where}.poly_degree: must be >= 0, got {section.poly_degree}")
    if section.poly_form not in ("tensor", "monomial"):
        raise ValueError(f"ModelConfig.{where}.poly_form: 'tensor' or 'monomial', got {section.poly_form!r}")


def atlas_spec(config: "ModelConfig") -> MemorySpec:
    """MemorySpec of layer ``X`` from ``config.atlas`` (+ ``config.titans``)."""
    a = config.atlas
    _check_common(a, "atlas")
    if a.optimizer not in ("muon", "momentum"):
        raise ValueError(f"ModelConfig.atlas.optimizer: 'muon' or 'momentum', got {a.optimizer!r}")
    return memory_spec(config, omega_window=a.omega_window, poly_degree=a.poly_degree, poly_form=a.poly_form,
                       ns_steps=a.ns_steps if a.optimizer == "muon" else 0, theta_max=a.theta_max)


def deep_transformer_spec(config: "ModelConfig") -> MemorySpec:
    """MemorySpec of layer ``D`` from ``config.atlas.deep_transformer`` (+ ``config.titans``)."""
    d = config.atlas.deep_transformer
    _check_common(d, "atlas.deep_transformer")
    return memory_spec(config, omega_window=d.omega_window, poly_degree=d.poly_degree, poly_form=d.poly_form,
                       ns_steps=0, bias="dot", momentum=d.momentum, decay=d.decay)


@register_layer("X", "atlas", "ATLAS memory layer: Omega rule, polynomial features, Muon inner optimiser")
def build_atlas(config: "ModelConfig", layer_index: int) -> NeuralMemory:
    return NeuralMemory(atlas_spec(config))


@register_layer("D", "deep_transformer", "DeepTransformer: deep memory with Hebbian (dot-product) bias replacing attention")
def build_deep_transformer(config: "ModelConfig", layer_index: int) -> NeuralMemory:
    return NeuralMemory(deep_transformer_spec(config))
