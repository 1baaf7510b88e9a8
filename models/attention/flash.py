"""Optional flash-attn path (CUDA only), guarded so that CPU installs never import it.

Used only for the cache-free training call in fp16/bf16; everything else (KV-cache continuation,
fp32, CPU) goes through PyTorch SDPA in ``layer.py``. Packed documents become
``flash_attn_varlen_func`` sequences via cumulative lengths; a sliding window of W tokens is
flash-attn's ``window_size=(W - 1, 0)``. The kernel call is not exercised by the CPU test suite
(the backend choice is): it must agree with SDPA within bf16 tolerance, which the GPU benchmark
checks when a device is available.

``backend="auto"`` falls back to SDPA quietly; ``"flash"`` insists, as ``mamba2.backend="mamba_ssm"``
does: without flash-attn installed, or on CPU/fp32 activations, the forward raises instead of
training on another kernel than the one asked for. With flash-attn installed, KV-cache
continuation (decoding) uses SDPA by design under either setting.
"""
from __future__ import annotations

from typing import Optional

import torch

try:  # pragma: no cover - depends on the machine
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAVE_FLASH = True
except ImportError:  # pragma: no cover
    flash_attn_func = flash_attn_varlen_func = None
    HAVE_FLASH = False


def flash_usable(q: torch.Tensor, backend: str, has_cache: bool) -> bool:
    """Whether the flash path applies: installed, CUDA half-precision input, no KV cache.

    Raises for ``backend="flash"`` when flash-attn is missing or the input does not suit it."""
    if backend == "sdpa":
        return False
    if backend == "flash" and not HAVE_FLASH:
        raise RuntimeError("attention.backend='flash' but flash-attn is not installed (pip install "
                           "'hybrid-lm[gpu]' or flash-attn>=2.5); use backend 'auto' to fall back to PyTorch SDPA")
    if not HAVE_FLASH or has_cache:
        return False
    ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not ok:
        raise RuntimeError(f"attention.backend='flash' needs CUDA fp16/bf16 activations, got {q.dtype} on "
                           f"{q.device.type}; use backend 'auto' to fall back to PyTorch SDPA")
    return ok


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor], window: Optional[int]
) -> torch.Tensor:  # pragma: no cover - CUDA only
    """q (B, T, H, d), k/v (B, T, KV, d) -> (B, T, H, d); causal, GQA handled by flash-attn."""
    win = (-1, -1) if window is None else (window - 1, 0)
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=win)
    batch, seqlen = doc_ids.shape
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seqlen] = True  # every row starts a sequence
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len, causal=True, window_size=win
    )
    return out.view(batch, seqlen, *out.shape[1:])
