"""Config of the ATLAS-family memory layers: ``X`` (ATLAS) and its own sub-section for ``D``
(DeepTransformer), so that one stack can hold both with different settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hybrid_lm.typed_config import require_at_least, require_positive, validate_section

# spelled out rather than imported from models/titans/features.py: ModelConfig imports this
# module, and the config layer stays free of torch and the layer packages
PolyForm = Literal["tensor", "monomial"]


@dataclass
class DeepTransformerConfig:
    """Layer ``D`` (the ATLAS paper's DeepTransformers): Hebbian (dot-product) bias
    ``-<M(phi(k)), v>``, a deep memory, plain gradient steps, no forgetting; with a linear memory
    it is unnormalised kernel attention ``y_t = W_0 phi(q_t) + sum_{i<=t} theta_i v_i phi(k_i).phi(q_t)``.
    Heads, depth, chunk size and gate scales come from ``TitansConfig``."""

    omega_window: int = 1
    """c = 1 is the DeepTransformer; c > 1 sums the last c tokens' Hebbian terms per step (the
    paper's sliding-window SWDT form; with no decay a token's term then enters c times)"""
    poly_degree: int = 2
    """degree of the polynomial map, the finite stand-in for the exponential map phi* whose
    kernel is exp(q.k); 0 disables (plain linear-attention kernel q.k)"""
    poly_form: PolyForm = "monomial"
    """layout of the polynomial features (see ``AtlasConfig.poly_form``); monomial by default for
    the same reason as ``X``: the same kernel and function class at about half the key size (D's
    100-step tiny.yaml training took 274 s of a loaded CI run with the tensor layout)"""
    momentum: bool = False
    """True adds Titans momentum (eta gate); the DeepTransformer has none"""
    decay: bool = False
    """True adds the forget gate alpha; the DeepTransformer (like softmax attention) never forgets"""

    def validate(self) -> None:
        require_at_least(self, 1, "omega_window")
        require_at_least(self, 0, "poly_degree")


@dataclass
class AtlasConfig:
    """ATLAS-specific settings; heads, depth, chunk size and gates come from ``TitansConfig``."""

    omega_window: int = 4
    """c: the memory objective covers the last c tokens (1 = Titans online rule). The paper does
    not state its value; 4 is our default"""
    poly_degree: int = 2
    """degree of the polynomial feature map of keys/queries (0 disables; paper value not stated).
    The key size grows as d^p: see models/titans/README.md for the memory cost"""
    poly_form: PolyForm = "monomial"
    """"tensor": the paper's self-tensor powers, 1 + d + ... + d^p features of a head dim d;
    "monomial": each distinct monomial once (sqrt-multinomial weights), C(d+p, p) features, the
    same kernel phi(q).phi(k) at about 1/p! of the key size. Monomial is the default: the first
    memory layer is linear in the features, so the duplicated tensor entries (x_i x_j and x_j x_i)
    add no function the monomial layout lacks, and a forward + backward of ``X-`` at d_model 192,
    512 tokens took 5.8 s instead of 22.8 s (one CPU thread, measured 2026-12-04)"""
    optimizer: Literal["muon", "momentum"] = "momentum"
    """inner optimiser: Newton-Schulz-orthogonalised momentum (``muon``, the paper's ATLAS) or plain
    momentum (the paper's "w/o Muon" ablation). Plain momentum is the default because Muon is not
    linear, so every token's weights are materialised: about 14 |W| floats per token and head
    (models/titans/README.md), by that estimate ~100 GB of activations for 2,048 tokens of one 128-wide layer,
    against ~35x less for the closed-form momentum read. The paper's own ablation (Table 6) gives
    no perplexity cost for dropping Muon (19.65 without vs 19.97 with). Muon's update is
    orthogonalised, so its writes are bounded by construction; plain momentum relies on
    ``titans.max_grad_norm``."""
    ns_steps: int = 5
    """Newton-Schulz iterations of the Muon step (5 in practice)"""
    theta_max: float = 0.1
    """X's own bound of the inner learning rate (replaces ``titans.theta_max`` for X). Its
    polynomial keys have squared norm ~2.5 at init (1 + |k|^2 + |k|^4 / 2 with unit k) instead
    of 1, which raises the curvature of the inner loss: at theta_max 0.2 the outer gradient norm
    of an ``X-`` model at init was 139 (964 with omega_window 1) against 20 at 0.1 (d_model 192,
    512 tokens), the sign of an inner loop whose sensitivity to its inputs grows chunk by chunk"""
    deep_transformer: DeepTransformerConfig = field(default_factory=DeepTransformerConfig)
    """settings of layer ``D``; the fields above are layer ``X``'s only"""

    def validate(self) -> None:
        require_at_least(self, 1, "omega_window")
        require_at_least(self, 0, "poly_degree", "ns_steps")
        require_positive(self, "theta_max")
        validate_section(self.deep_transformer, "deep_transformer")
