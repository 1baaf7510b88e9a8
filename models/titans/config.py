"""Config of the neural long-term memory layers (Titans LMM/MAC/MAG/MAL; ATLAS reuses the memory
fields and adds its own section in ``models/atlas/config.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hybrid_lm.typed_config import InvalidValue, require_at_least, require_positive


@dataclass(kw_only=True)
class MemoryUpdateConfig:
    """How a memory layer writes and reads its weights: the fields every memory letter (Titans
    T/C/G/L, ATLAS X/D) shares. ``TitansConfig`` (the config section) and ``MemorySpec`` (what one
    layer is built from) both derive from it, so the list exists once.

    Stability: a write is one step of (mini-batch) gradient descent on
    ``||M(k) - v||^2`` with l2-normalised keys. Within a chunk every token's gradient is taken at the
    chunk-start weights and the b steps add up, so the effective step on a direction the keys share
    is about ``2 theta b / (1 - eta)``; at the old defaults (theta 0.5, b 16, eta 0.5) that is ~32,
    far beyond what the loss tolerates (< 2), and the memory weights overflowed within 64 tokens.
    The gradient soft clamp (``max_grad_norm``, on by default) bounds every write whatever the gates
    learn, so the state stays bounded at any length, chunk size and gate value.
    """

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
    theta_max: float = 0.2
    """bound of the inner learning rate, theta_t = theta_max * sigmoid(.); ATLAS ``X`` has its own
    (``atlas.theta_max``). Chosen by measurement, between two failures. Larger steps make the inner
    loop unstable: the clamp below keeps the state bounded, but the outer gradient explodes with
    the chunks (total gradient norm of tiny.yaml ``M-C-M-A-`` at 512 tokens at init: 14.6 at 0.2,
    81 at 0.3, 8.8e3 at 1.0, against 9.9 for ``M-M-A-``; at 1.0 that run hit NaN within 30-50
    steps). Smaller steps write too weakly to learn associative recall (0.10 accuracy at 0.1
    against 0.45 at 1.0, tests/models/test_titans_learning.py). We keep the paper's summed squared
    error rather than titans-pytorch's mean over the value dim: our keys are l2-normalised, so the
    per-token curvature is 2 at any head width, and a mean would shrink the step by the head dim"""
    theta_bias_init: float = 0.0
    """initial bias of the learning-rate gate: theta = theta_max / 2 at init"""
    momentum_bias_init: float = 0.0
    """initial bias of the momentum gate: eta = 0.5 at init (paper silent)"""
    decay_bias_init: float = -4.0
    """initial bias of the forget gate: alpha ~ 0.018 at init, i.e. slow forgetting (paper silent)"""
    max_grad_norm: Optional[float] = 1.0
    """soft clamp of every token's inner gradient, per memory layer and head: a gradient of
    Frobenius norm g is rescaled to ``max_grad_norm * tanh(g / max_grad_norm)`` (titans-pytorch's
    ``max_grad_norm`` option, here on by default). It bounds each write by theta_max *
    max_grad_norm, so the momentum and the weights stay bounded for any gates, chunk size and
    length (the bound is in kernels/titans/chunked.py); without it the layer overflowed to NaN
    within 64 tokens at theta_max 1.0, and at theta_max 0.1 too once the gate saturates or with a
    chunk of 64 (measured). At initialisation token gradients have norm ~1.4-2.2, so it acts as a
    gentle normalisation. None switches it off (the
    paper's plain rule); Muon (``atlas.optimizer: muon``) is bounded by its orthogonalisation."""
    retention_mult: float = 1.0
    """state-collapse knob (the memory's decay multiplier, as Stuffed Mamba's for Mamba-2): every
    token's retention 1 - alpha_t is multiplied by this, in (0, 1], so the memory forgets at least
    that much per token (also a memory without a forget gate, ``D``). 1 leaves the layer bitwise
    unchanged; set at inference (``model.titans.retention_mult=0.99``) or in training"""

    def validate(self) -> None:
        """Values impossible for any memory layer."""
        require_at_least(self, 1, "memory_depth", "memory_expansion", "chunk_size")
        require_at_least(self, 0, "conv_size")
        require_positive(self, "theta_max", "max_grad_norm", "retention_mult")  # max_grad_norm: null = no clamp
        if not self.retention_mult <= 1.0:  # a retention above 1 grows the memory without bound
            raise InvalidValue("retention_mult", f"must be in (0, 1], got {self.retention_mult}")


@dataclass(kw_only=True)
class TitansConfig(MemoryUpdateConfig):
    """Neural memory hyperparameters (Titans, arXiv 2501.00663; ATLAS, arXiv 2505.23735): the memory
    fields of ``MemoryUpdateConfig`` plus heads and the attention of MAC/MAG/MAL.

    Values the paper leaves open are marked; defaults then follow lucidrains' titans-pytorch.
    """

    n_heads: int = 4
    """memory heads; each head has its own deep memory over d_model / n_heads channels
    (also the head count of the attention inside MAC/MAG/MAL)"""
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

    def validate(self) -> None:
        """Values impossible for any model (``ModelConfig`` runs this; ``validate_for_model`` checks
        the fit with d_model and the pattern)."""
        super().validate()
        require_at_least(self, 1, "n_heads", "window", "segment_len", "head_dim")
        require_at_least(self, 0, "n_persistent")
        require_positive(self, "rope_base")

    def validate_for_model(self, d_model: int, layer_pattern: str) -> None:
        """The shapes this section must fit, for the letters of ``layer_pattern`` that use it: every
        memory layer (Titans T/C/G/L, ATLAS X/D) splits d_model into ``n_heads`` memory heads, the
        attention of C/G/L needs an even RoPE head dim d_model / n_heads, and C's segments are whole
        chunks."""
        used = set(layer_pattern)
        if used & set("TCGLXD") and self.head_dim is None and d_model % self.n_heads:
            raise InvalidValue("n_heads", f"{self.n_heads} does not divide d_model={d_model}")
        if used & set("CGL") and (d_model % self.n_heads or (d_model // self.n_heads) % 2):
            raise InvalidValue("n_heads", f"the attention of layers C/G/L needs an even head dim d_model / n_heads, "
                                          f"got {d_model} / {self.n_heads}")
        if "C" in used and self.segment_len % self.chunk_size:
            raise InvalidValue("segment_len", f"{self.segment_len} is not a multiple of chunk_size={self.chunk_size}")
