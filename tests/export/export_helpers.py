"""Fixtures shared by the export tests: tiny random models per architecture, saved as model dirs.

Every model here is a few thousand parameters so that a whole export/load/generate round takes a
second or two on one CPU thread.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hybrid_lm.data.tokenizer import Tokenizer
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.kinds import build_lm
from hybrid_lm.models.model_dir import save_model_dir
from hybrid_lm.typed_config import from_dict

SMALL = {"vocab_size": 258, "d_model": 32, "attention": {"n_heads": 4, "n_kv_heads": 2},
         "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8}, "mlp": {"hidden_size": 48}}

#: architecture -> layer pattern (and extra config) of the tiny model that exercises it
CASES = {
    "llama": {"layer_pattern": "A-A-"},
    "mamba2": {"layer_pattern": "MM"},
    "bamba": {"layer_pattern": "M-A-"},
    "remote_titans": {"layer_pattern": "M-G-A-", "titans": {"chunk_size": 4, "window": 8}},
    "remote_window": {"layer_pattern": "MA-", "attention": {"n_heads": 4, "n_kv_heads": 2, "window": 6}},
    # ATLAS and DeepTransformer with the monomial feature layout, whose index tables are derived
    # at run time (a loader building on the meta device must not leave them uninitialised)
    "remote_atlas": {"layer_pattern": "X-D-A-", "titans": {"n_heads": 2, "chunk_size": 4},
                     "atlas": {"poly_form": "monomial", "deep_transformer": {"poly_form": "monomial"}}},
    # Mamba-2 with state-collapse knobs (remote code: HF's layers have none); the 5-token window
    # slides over the prompt and generation, decoding through the window's ring of write factors
    "remote_mamba_window": {"layer_pattern": "M-A-", "mamba2": {**SMALL["mamba2"], "state_window": 5,
                                                                "decay_mult": 0.95}},
    # a relaxed recursive model: 'A-' alone would be a Llama, but looped with per-loop LoRA it is ours only
    "remote_recursive": {"layer_pattern": "M-A-", "recursion": {"loops": 2, "lora_rank": 4}},
    # HMT: 4 text tokens per segment, so an 11-token prompt and 20 new tokens cross several segment
    # boundaries; the Mamba-2 state travels between segments (carry_backbone_state)
    "remote_hmt": {"layer_pattern": "M-A-", "hmt": {"segment_length": 8, "sensory_tokens": 2, "cache_size": 3,
                                                     "carry_backbone_state": True}},
}


def tiny_config(case: str, **overrides) -> ModelConfig:
    data = {**SMALL, **CASES[case], **overrides}
    return from_dict(ModelConfig, data, "model")


def tiny_model(config: ModelConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = build_lm(config).eval()
    with torch.no_grad():
        # random norms and Mamba parameters, so a swapped or dropped tensor changes the logits
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith(".lora_B"):  # LoRA's B starts at zero: make each loop differ
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny(tmp: Path, case: str, **overrides) -> tuple[Path, HybridLM]:
    config = tiny_config(case, **overrides)
    model = tiny_model(config)
    tok_dir = tmp / "tok"
    Tokenizer.byte_level().save(tok_dir)
    return save_model_dir(tmp / f"src_{case}", config, model.state_dict(), tok_dir), model


def prompt(batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
