"""The table of export targets: one adapter per Hugging Face architecture, chosen by layer pattern.

``select`` walks ``ADAPTERS`` in order; the remote-code adapter comes last and takes any pattern
whose families can be vendored. A new native target is one module (a ``NativeAdapter`` from
``native.py``) and one line in ``ADAPTERS``.
"""
from __future__ import annotations

from hybrid_lm.export.bamba import BambaAdapter
from hybrid_lm.export.llama import LlamaAdapter
from hybrid_lm.export.mamba2 import Mamba2Adapter
from hybrid_lm.export.native import Adapter
from hybrid_lm.export.remote import RemoteAdapter
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.model_dir import ExportError

ADAPTERS = (LlamaAdapter, Mamba2Adapter, BambaAdapter, RemoteAdapter)


def select(config: ModelConfig, target: str = "auto") -> Adapter:
    """The adapter for ``config``: ``auto`` (first exact native class, else remote code),
    ``native`` (refuse when no native class fits) or an adapter name (``llama``, ``remote``, ...)."""
    reasons = []
    for adapter in (cls() for cls in ADAPTERS):
        if target == "native" and adapter.name == "remote":
            continue
        if target not in ("auto", "native") and adapter.name != target:
            continue
        why = adapter.unsupported(config)
        if why is None and adapter.name != "remote" and config.recursion.loops > 1:
            # the native classes have one weight per layer: a looped block (and its per-loop LoRA) is ours only
            why = f"no transformers class loops a shared block (model.recursion.loops={config.recursion.loops})"
        if why is None and adapter.name != "remote" and config.hmt is not None:
            why = "no transformers class runs HMT's segment recurrence (model.hmt)"
        if why is None:
            return adapter
        reasons.append(f"  {adapter.name}: {why}")
    if not reasons:
        raise ExportError(f"unknown export target {target!r}")
    raise ExportError(f"no export mapping for layer_pattern {config.layer_pattern!r} (target {target}):\n"
                      + "\n".join(reasons))
