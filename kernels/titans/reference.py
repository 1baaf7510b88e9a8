"""Token-by-token oracle of the memory update: the test reference for ``chunked.py`` ONLY.

It applies the recurrence of ``chunked.py`` one token at a time with the same mini-batch rule
(gradients at the weights the current chunk started with; chunk_size=1 is exact online GD) and
evaluates every Omega-window term explicitly. Far too slow for training (a Python loop over
tokens); the benchmark uses it as the baseline.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from hybrid_lm.kernels.atlas.newton_schulz import newton_schulz
from hybrid_lm.kernels.titans.chunked import prepare_gates
from hybrid_lm.kernels.titans.memory_mlp import Bias, memory_forward, memory_grads


def sequential_memory_update(
    w: Sequence[torch.Tensor],
    s: Sequence[torch.Tensor],
    anchor: Sequence[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    q: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    valid: torch.Tensor,
    chunk_size: int,
    *,
    residual: bool,
    ns_steps: int = 0,
    bias: Bias = "l2",
    offset: int = 0,
    max_grad_norm: Optional[float] = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Same arguments and shapes as ``chunked_memory_update``; ``offset`` = tokens of the current
    chunk already processed before the first token. Returns y, final w, s and anchor."""
    cdt = torch.promote_types(k.dtype, torch.float32)
    inner, eta, alpha, outer = prepare_gates(theta.to(cdt), eta.to(cdt), alpha.to(cdt), valid, ns_steps > 0)
    w = [t.to(cdt) for t in w]
    s = [t.to(cdt) for t in s]
    anc = [t.to(cdt) for t in anchor]
    pos, seen = offset, False
    ys = []
    # Step through time with unbind: slicing x[:, t] in the loop would make the backward quadratic
    # in T (each slice's gradient is a zero-filled full-size buffer), inflating any speed-up
    # measured against this oracle.
    k_t, v_t, g_t, q_t = (x.to(cdt).unbind(1) for x in (k, v, gamma, q))
    eta_t, inner_t, alpha_t, outer_t = (x.unbind(1) for x in (eta, inner, alpha, outer))
    for t in range(theta.size(1)):
        grads = memory_grads(anc, k_t[t][:, None], v_t[t][:, None], g_t[t][:, None], residual, bias, max_grad_norm)
        for l, g in enumerate(grads):
            s[l] = eta_t[t][:, None, None] * s[l] - inner_t[t][:, None, None] * g[:, 0]
            upd = newton_schulz(s[l], ns_steps) if ns_steps > 0 else s[l]
            w[l] = (1.0 - alpha_t[t][:, None, None]) * w[l] + outer_t[t][:, None, None] * upd
        ys.append(memory_forward(w, q_t[t][:, None], residual)[:, 0])
        pos += 1
        seen = seen or bool(valid[:, t].any())
        if pos == chunk_size:
            # a chunk of padding only keeps the carried anchor (as in chunked.py)
            anc = list(w) if seen else anc
            pos, seen = 0, False
    return torch.stack(ys, dim=1), w, s, anc
