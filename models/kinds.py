"""The one place that turns a ``ModelConfig`` into a model: the model-kind switch.

``ModelConfig.kind`` names the kind; everything that builds a model from a config (the trainer,
``hybrid-lm eval``, checkpoint consolidation, export checks) calls ``build_lm`` instead of a class,
so a new kind is one entry in ``_BUILDERS``. Kinds: ``hybrid`` (the pattern stack,
``models/hybrid.py``; also its looped recursive form) and ``hmt`` (``models/hmt/``, the stack as
the backbone of a segment-recurrent memory model).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hmt.model import HMTLM
from hybrid_lm.models.hybrid import HybridLM

_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {"hybrid": HybridLM, "hmt": HMTLM}


def build_lm(config: ModelConfig) -> nn.Module:
    """The model ``config`` describes, freshly initialised (``HybridLM``'s call and ``generate``)."""
    return _BUILDERS[config.kind](config)


def adapt_init_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Weights for ``train.init_from`` -> (state with this kind's names, keys allowed to stay at init).

    An HMT model accepts the weights of a plain stack (its backbone, e.g. an imported Llama): they
    load under ``backbone.`` and the HMT parameters keep their init, the start of the two-stage
    recipe. Anything else loads as saved."""
    if config.kind == "hmt" and not any(k.startswith("backbone.") for k in state):
        with torch.device("meta"):
            own = {k for k in HMTLM(config).state_dict() if not k.startswith("backbone.")}
        return {f"backbone.{k}": v for k, v in state.items()}, own
    return state, set()


def tied_keys(config: ModelConfig) -> tuple[str, str]:
    """(embedding, LM head) weight names of ``config``'s model: a tied head is saved once, under the
    embedding's name, and restored from it."""
    prefix = "backbone." if config.kind == "hmt" else ""
    return f"{prefix}embed.weight", f"{prefix}lm_head.weight"
