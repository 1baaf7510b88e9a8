"""Config of the hierarchical memory transformer wrapper (``model.hmt``; HMT, arXiv 2405.06067).

``model.hmt: null`` (the default) is the plain pattern stack; a ``model.hmt`` section turns the same
stack into the backbone of a segment-recurrent HMT model (``models/hmt/model.py``). Defaults follow
the official HMT-pytorch code (its ``main.py``) except where a field says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hybrid_lm.typed_config import InvalidValue, require_at_least


@dataclass
class HMTConfig:
    segment_length: int = 256
    """positions the backbone sees per segment: one memory token, the sensory tokens, the segment's
    text tokens and the memory token again; so each segment holds
    ``segment_length - 2 - sensory_tokens`` new text tokens (``text_length``)"""
    sensory_tokens: int = 32
    """k: the last k tokens of the previous segment prepended to the next one (sensory memory);
    0 disables"""
    summary_fraction: float = 0.5
    """representation extraction summarises the first ``round(text_length * summary_fraction)``
    tokens of the segment"""
    cache_size: int = 100
    """N: the long-term cache keeps the N most recent memory embeddings (FIFO; the reference's
    ``mem_recall_context`` default; the paper reports 300)"""
    recall_hidden_size: Optional[int] = None
    """h: width of the memory-search query/key projections; None means d_model (the reference's
    default of 4096 is its 7B backbone's width)"""
    bptt_depth: int = 2
    """gradients flow through at most this many consecutive segments: every value carried between
    segments (cache, sensory memory, backbone states) is detached at each group of ``bptt_depth``
    segments, as the reference's training samples of ``bptt_depth`` segments do"""
    memory_search: bool = True
    """False: stage 1 of the two-stage recipe (RMT with sensory memory): the memory token is the
    previous segment's memory embedding, no summary pass, no recall; the recall weights still
    exist so stage 2 loads stage 1's checkpoint with ``train.init_from``"""
    freeze_backbone: bool = False
    """train only the HMT weights (T, m_init, the recall projections); the backbone, e.g. loaded with
    ``train.init_from`` from an imported model, keeps its weights (the reference tunes it with LoRA
    or not at all)"""
    carry_backbone_state: bool = False
    """carry the recurrent states of the backbone's stateful non-attention layers (Mamba-2, memory
    letters) from one segment's main pass to the next one of the same document. Off as in the
    paper, where the backbone sees one segment at a time; attention KV caches are never carried
    (that would make the window unbounded, which is what HMT replaces)"""

    @property
    def text_length(self) -> int:
        """L_s: new text tokens per segment."""
        return self.segment_length - 2 - self.sensory_tokens

    def summary_length(self, text_tokens: int) -> int:
        """j: tokens of a segment with ``text_tokens`` tokens that representation extraction reads."""
        return int(round(text_tokens * self.summary_fraction))

    def validate(self) -> None:
        require_at_least(self, 3, "segment_length")
        require_at_least(self, 0, "sensory_tokens")
        require_at_least(self, 1, "cache_size", "recall_hidden_size", "bptt_depth")
        if not 0.0 <= self.summary_fraction <= 1.0:
            raise InvalidValue("summary_fraction", f"must be in [0, 1], got {self.summary_fraction}")
        if self.text_length < max(1, self.sensory_tokens):
            raise InvalidValue("sensory_tokens", f"{self.sensory_tokens} leaves {self.text_length} text tokens per "
                               f"segment of segment_length={self.segment_length} (= segment_length - 2 - "
                               f"sensory_tokens); need at least max(1, sensory_tokens)")
