"""The typed description of a whole hybrid model.

One ``ModelConfig`` describes any stack: the layer pattern says which layer each residual block
holds, and each family reads only its own section. Invalid shapes fail at construction with a
message naming the field (``ModelConfig.attention.n_kv_heads: 3 does not divide n_heads=8``).

Layer pattern letters (one residual block each, pre-norm):

* ``A`` causal attention (GQA, RoPE, optional sliding window)
* ``M`` Mamba-2 (SSD)
* ``-`` SwiGLU MLP (channel mixer)
* further letters are registered by the families (Titans/ATLAS memory, ...);
  ``hybrid_lm.models.common.registry.layer_specs()`` lists them.

So ``"M-M-A-"`` is three blocks of (mixer, MLP): two Mamba-2 and one attention, the same
convention as Megatron's hybrid pattern and NemotronH (which write attention as ``*``).

``|`` marks where pipeline stages split the stack (``"M-M-|A-A-"``: two stages of four blocks), as
in Megatron's hybrid pattern. It is not a layer: the model ignores it (``block_pattern`` is the
pattern without it, block ``i`` is ``block_pattern[i]``); the trainer reads it when
``parallel.pipeline_parallel > 1`` (train/pipeline.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NoReturn, Optional

from hybrid_lm.models.atlas.config import AtlasConfig
from hybrid_lm.models.common.registry import layer_specs
from hybrid_lm.models.hmt.config import HMTConfig
from hybrid_lm.models.recursive.config import RecursionConfig
from hybrid_lm.models.titans.config import TitansConfig
from hybrid_lm.typed_config import InvalidValue, require_at_least, require_positive


#: separates pipeline stages in ``layer_pattern``; not a layer
STAGE_MARK = "|"


class ModelConfigError(InvalidValue):
    """An impossible model config; the message names the field (``ModelConfig.attention.n_heads``
    for an object built in code, ``model.attention.n_heads`` when a job config is loaded)."""


@dataclass
class AttentionConfig:
    n_heads: int = 4
    """query heads"""
    n_kv_heads: Optional[int] = None
    """key/value heads (grouped-query attention); None means n_heads (plain multi-head)"""
    head_dim: Optional[int] = None
    """channels per head; None means d_model // n_heads"""
    rope_base: float = 10000.0
    """RoPE base frequency (theta)"""
    window: Optional[int] = None
    """sliding-window size in tokens (each token sees itself and window-1 previous); None = full causal"""
    bias: bool = False
    """bias on the q/k/v/o projections"""
    backend: Literal["auto", "sdpa", "flash"] = "auto"
    """auto uses flash-attn when installed and on CUDA, else PyTorch scaled_dot_product_attention;
    flash insists: the forward raises when flash-attn is missing or the input is not CUDA fp16/bf16"""

    def validate(self) -> None:
        """Values impossible for any model; the fit with ``d_model`` is ``ModelConfig``'s check."""
        require_at_least(self, 1, "n_heads", "n_kv_heads", "head_dim", "window")
        require_positive(self, "rope_base")
        if self.head_dim is not None and self.head_dim % 2:
            raise InvalidValue("head_dim", f"RoPE needs an even head dim, got {self.head_dim}")


@dataclass
class Mamba2Config:
    """Mamba-2 mixer; defaults follow mamba_ssm's Mamba2 except d_state (128 there), headdim (64
    there) and chunk_size (256 there)."""

    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 32
    ngroups: int = 1
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    conv_bias: bool = True
    bias: bool = False
    norm_before_gate: bool = False
    backend: Literal["auto", "torch", "mamba_ssm"] = "auto"
    """auto uses mamba_ssm's kernels when installed and on CUDA, else the PyTorch chunked SSD"""
    dt_mult: float = 1.0
    """state-collapse knob (Stuffed Mamba): dt <- dt·dt_mult, in the forward and the decode step;
    > 1 forgets faster and writes more. 1 leaves the layer bitwise unchanged"""
    a_mult: float = 1.0
    """state-collapse knob: A <- A·a_mult (> 1: stronger decay, shorter memory)"""
    decay_mult: float = 1.0
    """state-collapse knob: every decay a_t <- a_t·decay_mult, in (0, 1] (< 1: the state forgets
    at least that much per token, whatever dt is)"""
    b_mult: float = 1.0
    """state-collapse knob: B <- B·b_mult (< 1: weaker writes)"""
    state_norm_max: Optional[float] = None
    """state normalisation: rescale each head's SSM state to Frobenius norm <= this after every
    decode step and at every chunk boundary of the forward (None: off)"""
    state_window: Optional[int] = None
    """windowed state: outputs read only the last this-many tokens' writes, by the exact identity
    S_t - (prod a)·S_{t-r} (costs one more scan in the forward; decoding keeps the last r tokens'
    write factors, r·(H·P + G·N + H) numbers per row; not with state_norm_max). None: off"""

    def validate(self) -> None:
        require_at_least(self, 1, "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "state_window")
        require_positive(self, "dt_mult", "a_mult", "decay_mult", "state_norm_max")
        require_at_least(self, 0, "b_mult")
        if not self.decay_mult <= 1.0:  # a decay above 1 makes the state grow without bound
            raise InvalidValue("decay_mult", f"must be in (0, 1], got {self.decay_mult}")
        if self.state_window is not None and self.state_norm_max is not None:
            raise InvalidValue("state_window", "cannot be combined with state_norm_max (the window's identity "
                                               "needs the unnormalised linear recurrence)")
        require_positive(self, "dt_min")
        if not self.dt_max >= self.dt_min:
            raise InvalidValue("dt_max", f"must be >= dt_min={self.dt_min}, got {self.dt_max}")
        require_at_least(self, 0, "dt_init_floor")
        low, high = self.A_init_range
        if not 0 < low <= high:  # A = -exp(A_log) is drawn from [low, high]; A_log = log(A) needs A > 0
            raise InvalidValue("A_init_range", f"need 0 < low <= high, got {list(self.A_init_range)}")


@dataclass
class MLPConfig:
    hidden_size: Optional[int] = None
    """SwiGLU hidden width; None means 8/3 * d_model rounded up to multiple_of"""
    multiple_of: int = 64

    def validate(self) -> None:
        require_at_least(self, 1, "hidden_size", "multiple_of")


@dataclass
class ModelConfig:
    vocab_size: int = 258
    d_model: int = 256
    layer_pattern: str = "M-M-A-"
    """one letter per residual block, ``|`` between pipeline stages; see the module docstring"""
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    rescale_prenorm_residual: bool = True
    """divide residual output projections by sqrt(number of blocks) at init (GPT-2 / mamba_ssm)"""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    titans: TitansConfig = field(default_factory=TitansConfig)
    atlas: AtlasConfig = field(default_factory=AtlasConfig)
    recursion: RecursionConfig = field(default_factory=RecursionConfig)
    """loop the pattern as one shared block (relaxed recursive transformer); off at loops=1"""
    hmt: Optional[HMTConfig] = None
    """a section here makes the stack the backbone of an HMT model (``models/hmt/``); null: the plain stack"""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def block_pattern(self) -> str:
        """``layer_pattern`` without the pipeline-stage marks ``|``: one letter per block."""
        return self.layer_pattern.replace(STAGE_MARK, "")

    @property
    def kind(self) -> str:
        """Which model the config builds (``hybrid_lm.models.kinds.build_lm``): ``hmt`` or ``hybrid``."""
        return "hmt" if self.hmt is not None else "hybrid"

    @property
    def n_blocks(self) -> int:
        return len(self.block_pattern)

    def _fail(self, field_name: str, message: str) -> NoReturn:
        raise ModelConfigError(field_name, message, section="ModelConfig")

    def validate(self) -> None:
        """Every section's own checks, then the shapes that tie them to ``d_model`` and the pattern
        (only for the families the pattern uses: an unused section's heads need not divide d_model)."""
        try:
            require_at_least(self, 1, "vocab_size", "d_model")
            require_at_least(self, 0, "norm_eps", "init_std")
        except InvalidValue as exc:
            self._fail(exc.key, exc.problem)
        for name in ("attention", "mamba2", "mlp", "titans", "atlas", "recursion", "hmt"):
            if getattr(self, name) is None:  # an optional section left out
                continue
            try:
                getattr(self, name).validate()
            except InvalidValue as exc:
                self._fail(f"{name}.{exc.key}", exc.problem)
        if not self.block_pattern:
            self._fail("layer_pattern", "is empty" if not self.layer_pattern else f"{self.layer_pattern!r} has no layers")
        if STAGE_MARK * 2 in self.layer_pattern or STAGE_MARK in (self.layer_pattern[0], self.layer_pattern[-1]):
            self._fail("layer_pattern", f"{self.layer_pattern!r} has an empty pipeline stage (every '|' must "
                                        "stand between two layers)")
        specs = layer_specs()
        for i, ch in enumerate(self.layer_pattern):
            if ch not in specs and ch != STAGE_MARK:
                known = ", ".join(f"{s.letter!r}={s.name}" for s in specs.values())
                self._fail("layer_pattern", f"unknown letter {ch!r} at position {i} of {self.layer_pattern!r} (known: {known})")
        att = self.attention
        if "A" in self.layer_pattern or att.window is not None:
            if att.head_dim is None and self.d_model % att.n_heads:
                self._fail("attention.n_heads", f"{att.n_heads} does not divide d_model={self.d_model}")
            kv = att.n_kv_heads or att.n_heads
            if att.n_heads % kv:
                self._fail("attention.n_kv_heads", f"{kv} does not divide n_heads={att.n_heads}")
            if self.attention_head_dim % 2:
                self._fail("attention.head_dim", f"RoPE needs an even head dim, got {self.attention_head_dim}")
        if "M" in self.layer_pattern:
            m = self.mamba2
            d_inner = m.expand * self.d_model
            if d_inner % m.headdim:
                self._fail("mamba2.headdim", f"{m.headdim} does not divide d_inner = expand*d_model = {d_inner}")
            nheads = d_inner // m.headdim
            if nheads % m.ngroups:
                self._fail("mamba2.ngroups", f"{m.ngroups} does not divide the {nheads} SSM heads")
        try:
            self.titans.validate_for_model(self.d_model, self.block_pattern)
        except InvalidValue as exc:
            self._fail(f"titans.{exc.key}", exc.problem)

    @property
    def attention_head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    @property
    def mlp_hidden_size(self) -> int:
        if self.mlp.hidden_size is not None:
            return self.mlp.hidden_size
        hidden = int(8 * self.d_model / 3)
        m = self.mlp.multiple_of
        return m * ((hidden + m - 1) // m)
