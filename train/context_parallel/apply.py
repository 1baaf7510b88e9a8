"""Attach context parallelism to a built ``HybridLM`` from outside, and the loss that goes with it.

    cp = ContextParallel(groups.cp_group, groups.cp_rank, groups.cp_size, seq_len, layout)
    runtime = apply_context_parallel(model, cp, attention="allgather")
    loss = ContextParallelLoss(runtime)(model_or_engine, input_ids, labels=..., doc_ids=..., position_ids=...)

``apply_context_parallel`` gives each block's layer its registered CP forward (attention: the
scheme asked for; every other family: ``cp_forward_for``). The model's classes, parameter names
and state dict do not change: the instance's ``forward`` is wrapped, and the wrapper runs the CP
forward only inside ``runtime.sharded()``. Outside it (evaluation, generation, export) the layers
run their own forward on whatever they are given, so an eval hook still sees whole sequences and
whole logits on every rank. A stateless per-token layer (the MLP) runs locally on its slice; a
stateful layer with no CP forward is refused, naming its letter.

``ContextParallelLoss`` slices the global batch for this rank (``slice_batch``), runs the model
on its slice and returns the loss of the *whole* batch: the sum of every rank's token losses
(an autograd all-reduce over the CP group) over the global count of labelled tokens. Its value is
the one-process loss on every CP rank; its backward gives each rank N times its share of the
gradient, and averaging over the data x context group (``dp_cp_group``, DeepSpeed's data-parallel
group through ``DeepSpeedMPU``) divides that N back out, so the update is the one-process update.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybrid_lm.models.attention.layer import Attention
from hybrid_lm.models.common.registry import get_layer_spec
from hybrid_lm.train.context_parallel import ContextParallel, cp_forward_for
from hybrid_lm.train.context_parallel.attention import attention_forward, local_positions
from hybrid_lm.train.context_parallel.collectives import all_reduce
from hybrid_lm.train.tensor_parallel import IGNORE_INDEX, _vocab_parallel_cross_entropy
from hybrid_lm.typed_config import ConfigError

#: the batch keys cut along the sequence (the data contract, data/README.md)
SEQUENCE_KEYS = ("input_ids", "labels", "doc_ids", "position_ids")
#: the modules whose import registers the families' CP forwards (``register_cp_forward``)
FAMILY_FORWARDS = ("hybrid_lm.train.context_parallel.mamba2", "hybrid_lm.train.context_parallel.memory")


def load_family_forwards() -> None:
    """Import every family's CP forward module (each registers itself on import)."""
    for name in FAMILY_FORWARDS:
        importlib.import_module(name)


def check_context_parallel(model_cfg: Any, seq_len: int, par: Any) -> None:
    """Config-load checks (ConfigError naming the key): slices divide ``data.seq_len``, Ulysses
    heads, and a CP forward for every stateful letter of the pattern (layers built on the meta
    device, so a large model costs nothing here)."""
    n = par.context_parallel
    if n == 1:
        return
    kind = getattr(model_cfg, "kind", "hybrid")
    if kind != "hybrid":  # HMT runs segment by segment with its own memory tokens: untested under CP
        raise ConfigError(f"parallel.context_parallel: {n} is not supported for the '{kind}' model kind (plain stacks only)")
    slices = n if par.context_parallel_layout == "contiguous" else 2 * n
    if seq_len % slices:
        raise ConfigError(f"data.seq_len: {seq_len} is not divisible by the {slices} slices of parallel.context_parallel"
                          f"={n} with context_parallel_layout={par.context_parallel_layout}")
    load_family_forwards()
    tp = getattr(par, "tensor_parallel", 1)
    with torch.device("meta"):
        for i, letter in enumerate(model_cfg.block_pattern):
            layer = get_layer_spec(letter).build(model_cfg, i)
            if isinstance(layer, Attention):
                # under TP the CP forward sees this rank's heads (the attention TP plan's local count)
                if par.context_parallel_attention == "ulysses" and (layer.n_heads // tp) % n:
                    heads = f"{layer.n_heads}" if tp == 1 else f"{layer.n_heads} / parallel.tensor_parallel={tp}"
                    raise ConfigError(f"parallel.context_parallel_attention: ulysses needs model.attention.n_heads="
                                      f"{heads} divisible by parallel.context_parallel={n} (or use allgather)")
            elif tp > 1 and getattr(layer, "stateful", False):
                # the recurrent CP forwards are tested on whole layers only, not on TP-sharded heads
                raise ConfigError(f"parallel.context_parallel: {n} with parallel.tensor_parallel={tp} supports "
                                  f"attention (A) and MLP (-) layers only, not '{letter}' ({type(layer).__name__}) yet")
            elif getattr(layer, "stateful", False) and cp_forward_for(layer) is None:
                raise ConfigError(f"parallel.context_parallel: layer '{letter}' ({type(layer).__name__}) has no "
                                  f"context-parallel forward; use a pattern without it or context_parallel=1")


class ContextParallelRuntime:
    """What ``apply_context_parallel`` attached: the CP description and the on/off switch."""

    def __init__(self, cp: ContextParallel) -> None:
        self.cp = cp
        self.active = False

    @contextmanager
    def sharded(self) -> Iterator[None]:
        """Inside: the model's layers take this rank's slice and run their CP forwards."""
        self.active = True
        try:
            yield
        finally:
            self.active = False


def _wrap(layer: nn.Module, fn: Callable[..., torch.Tensor], runtime: ContextParallelRuntime) -> None:
    own = layer.forward

    def forward(x: torch.Tensor, *, state: Any = None, doc_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_state: bool = False) -> tuple[torch.Tensor, Any]:
        if not runtime.active:
            return own(x, state=state, doc_ids=doc_ids, position_ids=position_ids, return_state=return_state)
        if state is not None or return_state:
            raise RuntimeError(f"context parallel: {type(layer).__name__} carries no state across calls "
                               "under context parallelism (training forward only)")
        return fn(layer, x, doc_ids=doc_ids, position_ids=position_ids, cp=runtime.cp), None

    layer.forward = forward  # an instance attribute: the class, parameters and state dict stay as they are


def apply_context_parallel(model: nn.Module, cp: ContextParallel, *, attention: str = "allgather") -> ContextParallelRuntime:
    """Give every block's layer of ``model`` (a ``HybridLM``) its CP forward; returns the runtime
    whose ``sharded()`` switches them on. Raises ValueError, naming the letter, for a stateful
    layer without a registered CP forward."""
    load_family_forwards()
    scheme = attention_forward(attention)
    runtime = ContextParallelRuntime(cp)
    plan = []
    for i, block in enumerate(model.blocks):
        layer = block.layer
        fn = scheme if isinstance(layer, Attention) else cp_forward_for(layer)
        if fn is None and getattr(layer, "stateful", False):
            raise ValueError(f"parallel.context_parallel: layer '{block.letter}' (block {i}, {type(layer).__name__}) "
                             "has no context-parallel forward; use a pattern without it or context_parallel=1")
        plan.append((layer, fn))
    for layer, fn in plan:  # only after every layer passed: a refusal leaves the model untouched
        if fn is not None:
            _wrap(layer, fn, runtime)
    return runtime


def slice_batch(batch: dict[str, Optional[torch.Tensor]], cp: ContextParallel) -> dict[str, Optional[torch.Tensor]]:
    """This rank's tokens of a global batch: every (B, T) sequence key cut to its slices (B, T/N)
    in local order; position_ids keep their global values (the document positions RoPE needs)."""
    out = dict(batch)
    pos = None
    for key in SEQUENCE_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if value.size(1) != cp.seq_len:
            raise ValueError(f"context parallel: batch '{key}' has length {value.size(1)}, expected the "
                             f"global sequence length {cp.seq_len}")
        if pos is None:
            pos = local_positions(cp, device=value.device)
        out[key] = value[:, pos]
    return out


class ContextParallelLoss:
    """The one-process loss of a global batch, computed from this rank's slice (module docstring).

    ``loss(model, input_ids, labels=..., **kwargs)``: ``model`` is the CP-applied model or its
    DeepSpeed engine; the batch tensors are the global (B, T) ones."""

    def __init__(self, runtime: ContextParallelRuntime, vocab: Optional[Any] = None) -> None:
        self.runtime = runtime
        #: ``tensor_parallel.VocabParallelLoss`` under TP: the slice's loss from vocabulary-sharded logits
        self.vocab = vocab

    def __call__(self, model: Callable[..., Any], input_ids: torch.Tensor, *, labels: torch.Tensor,
                 **kwargs: Any) -> torch.Tensor:
        cp = self.runtime.cp
        local = slice_batch({"input_ids": input_ids, "labels": labels, **kwargs}, cp)
        ids, labels = local.pop("input_ids"), local.pop("labels")
        with self.runtime.sharded(), (self.vocab.local_logits() if self.vocab is not None else nullcontext()):
            logits = model(ids, **local).logits
        if self.vocab is None:
            token_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        else:
            token_sum = _vocab_parallel_token_sum(logits, labels)
        count = (labels != -100).sum().to(token_sum.dtype)
        dist.all_reduce(count, group=cp.group)
        return all_reduce(token_sum, cp.group) / count


def _vocab_parallel_token_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of the token losses over ``labels != -100`` from vocabulary-sharded logits (what
    ``tensor_parallel.vocab_parallel_loss`` averages; a sum stays finite on a slice whose labels are
    all ignored, where a mean would be 0/0)."""
    keep = labels != IGNORE_INDEX
    per_token = _vocab_parallel_cross_entropy()(logits.float(), labels.masked_fill(~keep, 0))
    return (per_token * keep).sum()


def context_parallel_of(groups: Any, seq_len: int, layout: str) -> ContextParallel:
    """The ``ContextParallel`` of this rank from ``process_groups.ParallelGroups``."""
    return ContextParallel(group=groups.cp_group, rank=groups.cp_rank, size=groups.cp_size, seq_len=seq_len,
                           layout=layout)  # type: ignore[arg-type]
