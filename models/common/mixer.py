"""The one interface every layer of a hybrid stack implements.

A hybrid model is a sequence of pre-norm residual blocks, each holding one *layer*: a sequence
mixer (attention, Mamba-2, Titans memory, ...) or a channel mixer (SwiGLU MLP). The stack only
talks to layers through this interface, so a new family plugs in by registering a builder
(see ``registry.py``) and never edits the stack.

Conventions (shared by every family):

* ``x``: (B, T, D) activations, already normalised by the block.
* ``doc_ids``: (B, T) int64 or None. Tokens with equal ids in a row belong to the same document;
  wherever the id changes between t-1 and t a new document starts and a stateful layer resets
  its state to its initial value. Layers must give for a packed row exactly what they give for
  each document run separately (from a zero/initial state).
* ``position_ids``: (B, T) int64 or None; restart at 0 at each document. Only position-aware
  layers (RoPE attention) read them; None means ``arange(T)`` offset by any cached length.
* ``state``: a ``dict[str, Tensor]`` (layer specific) or None. ``state`` going in is the state
  after the previous segment; it applies to the *first* document of each row only. With
  ``return_state=True`` the layer returns the state after the last token, so that
  ``f(x[:, :t]) -> s; f(x[:, t:], state=s)`` equals ``f(x)`` on the second part.
* ``step(x_t, state)``: the recurrent/decode form on one token, x_t (B, D) -> y_t (B, D).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

State = dict[str, torch.Tensor]


class Layer(nn.Module):
    """Base class of every layer a block can hold. Stateless layers keep the defaults."""

    #: True when the layer carries state across tokens beyond what ``x`` holds (caches, SSM state).
    stateful: bool = False
    #: True when that state has a fixed size (an SSM state, not a growing cache), so training may
    #: carry it from batch to batch (``train.state_passing``, train/state_passing.py)
    state_passing: bool = False

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        state: Optional[State] = None,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        """Decode one token: x (B, D) -> (y (B, D), new state). Stateless layers need no state."""
        y, _ = self.forward(x[:, None, :])
        return y[:, 0, :], state

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> Optional[State]:
        """The state before the first token (None for stateless layers)."""
        return None

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add), Megatron convention.

        Matmuls with weights count 2*in*out; an attention core counts QK^T and AV over the score
        entries its mask lets through (``models/attention/window.causal_context``: (T + 1) / 2 keys
        per query without a window, almost W with one); other layers count their matmuls as
        computed. tests/models/test_flops.py holds every family to torch's FlopCounterMode. The
        trainer multiplies by 3 for forward + backward.
        """
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Family-specific initialisation, run *after* the stack's generic init (normal(0, std)).

        Layers override this for parameters with paper-specific init (A_log, dt_bias, memory
        weights). Output projections into the residual stream are marked with
        ``weight._is_residual_projection = True`` so the stack can rescale them.
        """


def linear_flops(in_features: int, out_features: int) -> float:
    """Forward FLOPs of one token through an ``in -> out`` matmul."""
    return 2.0 * in_features * out_features
