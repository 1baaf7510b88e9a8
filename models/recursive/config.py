"""Config of the relaxed recursive transformer (Bae et al., ICLR 2025, arXiv 2410.20672).

With ``loops = L > 1`` the layer pattern describes one *shared block* of K blocks that the stack
applies L times (unrolled depth K x L); the embedding, final norm and LM head are not looped. Each
loop may carry its own LoRA on the block's linear maps (the "relaxed" model). ``loops = 1`` is the
plain stack, so every existing config means what it meant.

Kept free of torch, like the rest of the config layer (``ModelConfig`` imports it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hybrid_lm.typed_config import InvalidValue, require_at_least


@dataclass
class RecursionConfig:
    loops: int = 1
    """times the layer pattern (the shared block) is applied; 1 = an ordinary, non-looped stack"""
    lora_rank: int = 0
    """rank of each loop's LoRA on the shared block's linear maps; 0 = strict weight tying (the
    Recursive Transformer). The paper's relaxed models use 64-512 on 2B models"""
    lora_targets: list[str] = field(default_factory=lambda: ["*"])
    """which linear maps of the block get LoRA: shell patterns (fnmatch) on a linear's path inside
    its block, e.g. ``layer.q_proj``, ``*_proj``, ``layer.*``; ``*`` = every linear (public
    re-implementations adapt all of Q, K, V, O and the MLP, the paper does not say)"""
    exit_threshold: Optional[float] = None
    """early exit in generation (the paper's early exit): after each loop the shared final norm + LM head score
    the next token, and a row stops looping once its top probability is >= this. None = never
    exit (the full model); 0 = always exit after the first loop"""

    def validate(self) -> None:
        require_at_least(self, 1, "loops")
        require_at_least(self, 0, "lora_rank")
        if self.lora_rank and self.loops == 1:
            raise InvalidValue("lora_rank", f"per-loop LoRA needs loops > 1, got lora_rank={self.lora_rank} with loops=1")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise InvalidValue("lora_targets", f"must be a non-empty list of name patterns, got {self.lora_targets!r}")
        if self.exit_threshold is not None and not 0.0 <= self.exit_threshold <= 1.0:
            raise InvalidValue("exit_threshold", f"must be a probability in [0, 1] or null, got {self.exit_threshold}")
