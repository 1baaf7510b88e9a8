"""Hugging Face config of an exported hybrid-lm model (remote code; needs only torch + transformers).

The whole hybrid-lm ``ModelConfig`` travels as one plain dict (``hybrid_lm``) so that the vendored
model code rebuilds exactly the trained architecture; the top-level fields transformers reads
(vocab size, hidden size, tying, special ids) are copies of it.
"""
from transformers import PretrainedConfig


class HybridLMConfig(PretrainedConfig):
    model_type = "hybrid_lm"

    def __init__(self, hybrid_lm=None, **kwargs):
        self.hybrid_lm = dict(hybrid_lm or {})
        kwargs.setdefault("vocab_size", self.hybrid_lm.get("vocab_size"))
        kwargs.setdefault("hidden_size", self.hybrid_lm.get("d_model"))
        kwargs.setdefault("num_hidden_layers", len(self.hybrid_lm.get("layer_pattern", "")))
        kwargs.setdefault("tie_word_embeddings", bool(self.hybrid_lm.get("tie_embeddings", False)))
        # generation carries the layers' states in a HybridLMCache (see modeling_hybrid_lm.py)
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)
