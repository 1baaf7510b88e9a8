"""Guarded imports of the mamba_ssm / causal-conv1d CUDA kernels.

``backend="auto"`` uses them when installed and the input is on CUDA; ``"torch"`` never does;
``"mamba_ssm"`` insists (and fails loudly otherwise). The PyTorch path in ``kernels/ssd`` is the
fallback and the ground truth; the kernels must agree with it within bf16 tolerance.
"""
from __future__ import annotations

import torch

from hybrid_lm.kernels.ssd.reference import segment_index

try:  # pragma: no cover - depends on the machine
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:  # pragma: no cover
    mamba_chunk_scan_combined = None

try:  # pragma: no cover
    from causal_conv1d import causal_conv1d_fn
except ImportError:  # pragma: no cover
    causal_conv1d_fn = None


def use_mamba_kernels(x: torch.Tensor, backend: str) -> bool:
    """Whether the fused SSD scan applies to activations ``x``."""
    if backend == "torch":
        return False
    available = mamba_chunk_scan_combined is not None and x.is_cuda
    if backend == "mamba_ssm" and not available:
        raise RuntimeError("mamba2.backend='mamba_ssm' needs mamba_ssm installed and CUDA inputs")
    return available


def use_conv_kernel(x: torch.Tensor, backend: str, has_state: bool) -> bool:
    """causal_conv1d_fn has no initial state in its seq_idx mode, so carried states use torch."""
    return backend != "torch" and causal_conv1d_fn is not None and x.is_cuda and not has_state


def seq_idx_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> int32 non-decreasing segment index from 0, the kernels' ``seq_idx``."""
    return segment_index(doc_ids).to(torch.int32)
