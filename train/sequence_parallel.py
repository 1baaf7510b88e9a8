"""Megatron-style sequence parallelism on top of tensor parallelism (``parallel.sequence_parallel``).

    groups = process_groups.init_process_groups(tensor_parallel=2)
    apply_tensor_parallel(model, groups)        # heads split (train/tensor_parallel.py)
    apply_sequence_parallel(model, groups)      # the residual stream split along the sequence

With plain tensor parallelism every TP rank holds the whole (B, T, D) residual stream, its
pre-norms and the final norm: replicated activations that do not shrink with the degree. Here they
are split along the sequence over the TP group (rank r holds tokens ``[r T/N, (r+1) T/N)``), as in
Megatron (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"):

* the embedding's vocabulary-partial lookup is reduce-scattered along T instead of all-reduced;
* each block normalises its (B, T/N, D) slice, and the norm's output is all-gathered at the
  layer's entry, so the layer (attention, Mamba-2 conv/SSM, Titans/ATLAS memories: they need the
  whole sequence and the full ``doc_ids``/``position_ids``) runs its own code unchanged on its head
  shard. Backward: the gathered input's gradient is reduce-scattered;
* the layer's row-parallel output is reduce-scattered along T instead of all-reduced, for the
  layers whose output *is* that projection (``DEFERRED_OUTPUT``: attention, Mamba-2, the MLP and
  the neural memories T/X/D). MAC/MAG/MAL (``C``/``G``/``L``) finish with replicated work on
  reduced activations, so they keep their all-reduces and the result is split (backward: the
  gradient is all-gathered). Both are exact; the first moves half the bytes;
* the final norm runs on the slice and the (vocabulary-parallel) head all-gathers its input.

Per layer that replaces the forward all-reduce by an all-gather and a reduce-scatter (the same
bytes) and does the same in backward, while the activations between layers (residual, norms, the
norms' inputs kept for backward) shrink N times.

Gradients. A column-parallel linear normally copies its replicated input into the TP region, whose
backward all-reduces the input gradient (one all-reduce per linear). Here the linears that read the
gathered tensor itself read a twin of it (same storage, ``_GatherForLayer``) and skip that copy: the
twin's gradient, a per-rank partial sum, is reduce-scattered once per layer. Everything else the
layer computes from its input (replicated work: MAC's segments, gates) reaches the other output,
whose gradient is already complete and equal on every rank, and keeps just this rank's slice. The
block norms and the final norm are replicated but see only T/N tokens: their weight gradients are
summed over the TP group (Megatron's ``sequence_parallel`` parameter flag, set here too).

The split is decided per forward call: a call whose length does not divide by N (an eval prompt,
generation) and ``step`` decoding run as plain tensor parallelism. Config load requires
``data.seq_len % tensor_parallel == 0``, so every training step is split. megatron-core's own
sequence mappings gather along dim 0 (its (T, B, D) layout) and allocate on CUDA; ours are (B, T, D)
on any device, hence the small functions below.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybrid_lm.models.attention.layer import Attention
from hybrid_lm.models.common.mlp import SwiGLU
from hybrid_lm.models.hybrid import Block, HybridLM
from hybrid_lm.models.mamba2.layer import Mamba2
from hybrid_lm.models.titans.memory import NeuralMemory
from hybrid_lm.train.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             VocabParallelHead, _GatherLastDim)
from hybrid_lm.typed_config import ConfigError

#: layer class -> its row-parallel projection whose output the layer returns as is (checked at
#: every call: a layer that post-processes it fails loudly instead of computing on a partial sum)
DEFERRED_OUTPUT: dict[type, str] = {Attention: "o_proj", Mamba2: "out_proj", SwiGLU: "down_proj",
                                    NeuralMemory: "out_proj"}

SEQ_DIM = 1  # (B, T, D)


def check_sequence_parallel(seq_len: int, parallel: Any) -> None:
    """ConfigError unless ``parallel.sequence_parallel`` has the tensor-parallel group and sequence
    length it needs (run at config load, where ``data.seq_len`` is known)."""
    if not getattr(parallel, "sequence_parallel", False):
        return
    tp = parallel.tensor_parallel
    if tp < 2:
        raise ConfigError(f"parallel.sequence_parallel: needs parallel.tensor_parallel > 1 (the sequence is split "
                          f"over the tensor-parallel group), got tensor_parallel={tp}")
    if parallel.pipeline_parallel > 1:
        raise ConfigError(f"parallel.sequence_parallel: not supported with parallel.pipeline_parallel="
                          f"{parallel.pipeline_parallel} yet")
    if seq_len % tp:
        raise ConfigError(f"data.seq_len: {seq_len} is not divisible by parallel.tensor_parallel={tp}, "
                          "which parallel.sequence_parallel needs (each rank holds seq_len/tensor_parallel tokens)")


def _all_gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter(x: torch.Tensor, group: Any) -> torch.Tensor:
    chunks = [c.contiguous() for c in x.chunk(dist.get_world_size(group), dim=SEQ_DIM)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


def _local(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=SEQ_DIM)[dist.get_rank(group)].contiguous()


class _Gather(torch.autograd.Function):
    """(B, T/N, D) -> (B, T, D); backward reduce-scatters the partial gradients (Megatron's
    ``gather_from_sequence_parallel_region`` before a column-parallel linear)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """Partial sums (B, T, D) -> this rank's summed (B, T/N, D); backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _all_gather(grad, ctx.group), None


class _Split(torch.autograd.Function):
    """A replicated (B, T, D) -> this rank's (B, T/N, D); backward all-gathers (every rank's slice
    of the gradient of the one replicated value)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _local(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _all_gather(grad, ctx.group), None


class _GatherForLayer(torch.autograd.Function):
    """(B, T/N, D) -> two (B, T, D) views of one all-gathered tensor: ``full`` for the layer and
    ``for_columns`` for the column-parallel linears that read it. Backward: the linears' partial
    gradient is reduce-scattered; the rest (complete and equal on every rank) keeps its slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.group = group
        ctx.set_materialize_grads(False)
        full = _all_gather(x, group)
        return full, full.view_as(full)

    @staticmethod
    def backward(ctx, grad_full: Optional[torch.Tensor],  # type: ignore[override]
                 grad_columns: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], None]:
        # every rank runs the same layer code, so both are None or not on all ranks alike
        grad = None if grad_columns is None else _reduce_scatter(grad_columns, ctx.group)
        if grad_full is not None:
            own = _local(grad_full, ctx.group)
            grad = own if grad is None else grad + own
        return grad, None


class SequenceParallelState:
    """What the swapped modules and hooks of one model share."""

    def __init__(self, group: Any, size: int) -> None:
        self.group, self.size = group, size
        self.active = False
        """whether the latest forward call split its sequence (kept after the call, for the backward
        pass and activation checkpointing's recomputation of that call)"""
        self.column_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """id of a layer's gathered input -> (it, its twin for column-parallel linears)"""

    def twin(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        entry = self.column_inputs.get(id(x))
        return entry[1] if entry is not None and entry[0] is x else None


class SPColumnParallelLinear(ColumnParallelLinear):
    """Reads the twin of a gathered layer input without the copy to the TP region (its gradient is
    reduce-scattered once by ``_GatherForLayer``); any other input as plain tensor parallelism."""

    sp: SequenceParallelState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        twin = self.sp.twin(x)
        return super().forward(x) if twin is None else F.linear(twin, self.weight, self.bias)


class SPRowParallelLinear(RowParallelLinear):
    """A layer's output projection: while ``defer`` is set (by its block's hooks), returns its
    partial sum without bias for the block to reduce-scatter."""

    sp: SequenceParallelState
    defer: bool = False
    partial: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.defer:
            return super().forward(x)
        self.defer = False  # one deferred call per layer call
        self.partial = F.linear(x, self.weight)
        return self.partial


class SPVocabParallelEmbedding(VocabParallelEmbedding):
    """The vocabulary-partial lookup reduce-scattered along T: (B, T) ids -> (B, T/N, D)."""

    sp: SequenceParallelState

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not (self.sp.active and ids.dim() == 2):
            return super().forward(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return _ReduceScatter.apply(out, self.sp.group)


class SPVocabParallelHead(VocabParallelHead):
    """The head all-gathers the final norm's (B, T/N, D) slice (backward: reduce-scatter, in place
    of the TP copy's all-reduce), then local or gathered logits as ``VocabParallelHead``."""

    sp: SequenceParallelState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.sp.active and x.dim() == 3):
            return super().forward(x)
        logits = F.linear(_Gather.apply(x, self.sp.group), self.weight, self.bias)
        return logits if not self.gather_output else _GatherLastDim.apply(logits, self.tp_group)


def _swap(module: nn.Module, cls: type, sp: SequenceParallelState) -> None:
    module.__class__ = cls
    module.sp = sp  # type: ignore[assignment]


def _sum_over_tp(sp: SequenceParallelState) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if not sp.active:  # a backward through an unsplit call: the gradient is whole already
            return grad
        grad = grad.clone()
        dist.all_reduce(grad, group=sp.group)
        return grad

    return hook


def _attach_block(block: Block, sp: SequenceParallelState) -> None:
    layer = block.layer
    name = next((n for cls, n in DEFERRED_OUTPUT.items() if type(layer) is cls), None)
    out = getattr(layer, name) if name is not None else None
    if out is not None and type(out) is not RowParallelLinear:
        out = None  # not split: the layer's output is replicated, and is split below
    if out is not None:
        _swap(out, SPRowParallelLinear, sp)
    entered: list[torch.Tensor] = []  # this block's gathered input during its layer's call

    def norm_hook(_m: nn.Module, _args: Any, y: torch.Tensor) -> torch.Tensor:
        if not (sp.active and y.dim() == 3):
            return y
        full, for_columns = _GatherForLayer.apply(y, sp.group)
        sp.column_inputs[id(full)] = (full, for_columns)
        return full

    def layer_pre_hook(_m: nn.Module, args: tuple) -> None:
        if args and sp.twin(args[0]) is not None:
            entered.append(args[0])
            if out is not None:
                out.defer = True

    def layer_hook(_m: nn.Module, args: tuple, output: tuple) -> tuple:
        if not (entered and args and args[0] is entered[-1]):
            return output
        sp.column_inputs.pop(id(entered.pop()), None)
        y, state = output
        if out is None:
            y = _Split.apply(y, sp.group)
        else:
            partial, out.partial = out.partial, None
            if y is not partial:
                raise RuntimeError(f"sequence parallel: {type(layer).__name__} did not return its "
                                   f"{name}'s output as is; remove it from DEFERRED_OUTPUT")
            y = _ReduceScatter.apply(y, sp.group)
            if out.bias is not None:
                y = y + out.bias
        return y, state

    block.norm.register_forward_hook(norm_hook)
    layer.register_forward_pre_hook(layer_pre_hook)
    layer.register_forward_hook(layer_hook)


def apply_sequence_parallel(model: HybridLM, groups: Any) -> SequenceParallelState:
    """Split ``model``'s residual stream along the sequence over ``groups.tp_group`` (after
    ``apply_tensor_parallel``, before the optimizer or DeepSpeed). Parameters, names and state dict
    are unchanged. Returns the shared state (``.active``: whether the latest call was split)."""
    if groups.tp_size < 2:
        raise ValueError("sequence parallelism needs a tensor-parallel group of 2 or more ranks")
    if not isinstance(model.embed, VocabParallelEmbedding) or not isinstance(model.lm_head, VocabParallelHead):
        raise ValueError("apply_sequence_parallel: apply_tensor_parallel first")
    sp = SequenceParallelState(groups.tp_group, groups.tp_size)
    _swap(model.embed, SPVocabParallelEmbedding, sp)
    _swap(model.lm_head, SPVocabParallelHead, sp)
    for module in model.modules():
        if type(module) is ColumnParallelLinear:
            _swap(module, SPColumnParallelLinear, sp)
    for block in model.blocks:
        _attach_block(block, sp)
    for norm in [b.norm for b in model.blocks] + [model.final_norm]:
        for p in norm.parameters():
            p.sequence_parallel = True  # Megatron's mark: replicated, gradient from T/N tokens per rank
            p.register_hook(_sum_over_tp(sp))
    forward = model.forward

    def split_forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sp.active = input_ids.dim() == 2 and input_ids.size(SEQ_DIM) % sp.size == 0
        return forward(input_ids, *args, **kwargs)

    model.forward = split_forward  # type: ignore[method-assign]
    return sp
