"""Early exit in generation for a looped model (Bae et al.).

Every loop boundary yields a valid hidden state, so the shared final norm + LM head can score the
next token after loop 1, 2, ...; the batch leaves the loop once every row's top probability is at
least ``threshold`` (``None``: never, the full model; ``0``: always after loop 1, the 1-loop model).
The decision is taken on the last position, in prefill as in each decoding step.

A token that exits at loop l is never seen by loops > l: their recurrent states and KV caches skip
it, exactly as if those loops had been run on the sequence without it (positions stay the true
ones: blocks get explicit ``position_ids``). That is the price of skipping the compute; it is why
the threshold should stay high. The paper's continuous depth-wise batching (rows at different loops
in one batch, refilled as they exit) is not built: a batch exits together.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # hybrid.py imports this module for ``generate``
    from hybrid_lm.models.hybrid import HybridLM


def confident(logits: torch.Tensor, threshold: Optional[float]) -> bool:
    """True when every row's top next-token probability reaches ``threshold`` (never for None)."""
    if threshold is None:
        return False
    return bool((torch.softmax(logits.float(), dim=-1).amax(dim=-1) >= threshold).all())


@torch.no_grad()
def generate_with_early_exit(model: "HybridLM", input_ids: torch.Tensor, max_new_tokens: int, *,
                             threshold: Optional[float], temperature: float = 0.0,
                             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, list[int]]:
    """input_ids (B, T) -> (tokens (B, T + max_new_tokens), loops run per step, prefill first)."""
    batch, length = input_ids.shape
    n = len(model.blocks)
    states = model.init_states(batch, device=input_ids.device)
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    tokens, current, loops_run = [input_ids], input_ids, []
    for step in range(max_new_tokens + 1):
        x = model.embed(current)
        for loop in range(model.loops):
            model.loop.value = loop
            for i, block in enumerate(model.blocks):
                x, states[loop * n + i] = block(x, state=states[loop * n + i], position_ids=positions,
                                                return_state=True)
            logits = model.lm_head(model.final_norm(x[:, -1]))
            if confident(logits, threshold):
                break
        loops_run.append(loop + 1)
        if step == max_new_tokens:
            break
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(dim=-1)
        tokens.append(nxt[:, None])
        current, positions = nxt[:, None], positions[:, -1:] + 1
    return torch.cat(tokens, dim=1), loops_run
