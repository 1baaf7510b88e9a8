"""Apply the families' tensor-parallel plans to a built model, from outside the model code.

    groups = process_groups.init_process_groups(tensor_parallel=2)
    model = HybridLM(cfg)                          # full weights, seeded identically on every rank
    apply_tensor_parallel(model, groups)           # now each rank holds its share of every split module
    full = full_tensors(model, groups)             # the unsplit weights (or grads=True: gradients) again

Each family's plan (``models/<family>/tp_plan.py``, format in ``models/common/tp_plan.py``) says
which linears are column-/row-/vocab-parallel, how fused projections and other parameters are cut,
which replicated parameters only see local heads, and which head counts become local. Here that
becomes megatron-core's tensor-parallel mappings around the same ``nn.Linear``/``nn.Embedding``
objects (their class is swapped for a subclass whose ``forward`` adds the collective), so parameter
names, ``isinstance`` checks and the layers' own code are unchanged: the layers read their local
head counts and run on their share.

Weights are cut from the full model every rank built with the same seed, so a TP run starts from
exactly the weights of the 1-process run (Megatron's CUDA RNG tracker is never needed, and
everything works on gloo).

The LM head's logits are gathered over the vocabulary shards by default, so evals, generation,
export checks and the model's own cross-entropy see full (B, T, V) logits. Training does not:
``VocabParallelLoss`` (which the engine calls instead of reading ``ModelOutput.loss``) runs the
model without labels with the head left local, (B, T, V/tp), and computes the loss with
megatron-core's ``vocab_parallel_cross_entropy`` (three all-reduces of (B, T) values), so no rank
ever holds the full logits of a training step. The model code keeps its own plain loss.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybrid_lm.models.common.mixer import Layer
from hybrid_lm.models.common.tp_plan import Split, TPPlan, has_plan, plan_for, tp_requirements
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.typed_config import ConfigError


def check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """ConfigError naming the first model key that ``tp`` does not divide (run at config load)."""
    if tp == 1:
        return
    for req in tp_requirements(model):
        if req.value % tp:
            raise ConfigError(req.problem(tp))


@functools.cache
def _mappings() -> Any:
    """megatron.core.tensor_parallel.mappings (imported once, without its warnings about missing
    Transformer Engine/Apex, optional CUDA extensions we do not use)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.tensor_parallel import mappings
    return mappings


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's slice. megatron's
    ``gather_from_tensor_model_parallel_region`` does the same but allocates on CUDA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.width = group, x.size(-1)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        start = dist.get_rank(ctx.group) * ctx.width
        return grad[..., start:start + ctx.width].contiguous(), None


class ColumnParallelLinear(nn.Linear):
    """Output features split: replicated input (its gradient all-reduced), local output slice."""

    tp_group: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _mappings().copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """Input features split: local partial product, all-reduced; the (replicated) bias added once."""

    tp_group: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _mappings().reduce_from_tensor_model_parallel_region(F.linear(x, self.weight), group=self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[vocab_start, vocab_start + num_embeddings)``; other ids give zeros here and their
    row on the rank holding it; the sum over ranks is the full lookup (Megatron's layout)."""

    tp_group: Any
    vocab_start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return _mappings().reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


class VocabParallelHead(nn.Linear):
    """LM head over this rank's vocabulary rows; the logits are gathered to the full vocabulary
    unless ``gather_output`` is off (inside ``VocabParallelLoss.local_logits``: the training step)."""

    tp_group: Any
    gather_output: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gather_output:
            x = _mappings().copy_to_tensor_model_parallel_region(x, group=self.tp_group)
            return F.linear(x, self.weight, self.bias)
        return vocab_parallel_logits(x, self.weight, self.tp_group, self.bias)


def vocab_parallel_logits(x: torch.Tensor, weight: torch.Tensor, group: Any,
                          bias: torch.Tensor | None = None, *, gather: bool = True) -> torch.Tensor:
    """(..., D) activations times this rank's (V/N, D) vocabulary rows, gathered to (..., V) logits,
    or this rank's (..., V/N) with ``gather=False`` (for ``vocab_parallel_loss``); also the
    pipeline's tied head on its last stage, which holds the embedding shard."""
    x = _mappings().copy_to_tensor_model_parallel_region(x, group=group)
    local = F.linear(x, weight, bias)
    return _GatherLastDim.apply(local, group) if gather else local


@functools.cache
def _vocab_parallel_cross_entropy() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    return vocab_parallel_cross_entropy


#: labels that count in no loss (document ends and padding, data/packing.py), as in HybridLM's loss
IGNORE_INDEX = -100


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over ``labels != -100`` from vocabulary-sharded logits: what
    ``F.cross_entropy(full_logits, labels, ignore_index=-100)`` gives, without the full logits.

    logits (B, T, V/N): this rank's vocabulary rows ``[rank*V/N, (rank+1)*V/N)`` (the layout of
    ``VocabParallelEmbedding``/``VocabParallelHead``); labels (B, T) int64, global ids. Returns a
    scalar, the same on every rank of the tensor-parallel group (megatron-core takes the group
    from ``parallel_state``, where ``process_groups`` made it). NaN when every label is ignored,
    as F.cross_entropy."""
    keep = labels != IGNORE_INDEX
    # megatron's kernel has no ignore_index: an ignored label gets id 0 (a real row, so its value
    # stays finite) and is masked out of the mean. The kernel also overwrites its input with the
    # softmax to save memory; that is safe here: .float() copies bf16 logits, and fp32 logits fresh
    # from the head's matmul are needed by no backward (a linear keeps its input, not its output).
    per_token = _vocab_parallel_cross_entropy()(logits.float(), labels.masked_fill(~keep, 0))
    return (per_token * keep).sum() / keep.sum()


class VocabParallelLoss:
    """The training loss of a model split by ``apply_tensor_parallel``, from sharded logits.

        loss_fn = VocabParallelLoss(model)
        loss = loss_fn(model_or_its_deepspeed_engine, input_ids, labels=labels, doc_ids=..., position_ids=...)

    Calls the model without labels while its vocabulary-parallel heads return local logits, then
    ``vocab_parallel_loss``: no rank holds the full (B, T, V) logits, and the value and gradients
    are those of the model's own loss (the head's input gradient is all-reduced by its
    copy-to-region mapping, as for any column-parallel layer). Tied weights stay one parameter."""

    def __init__(self, model: nn.Module) -> None:
        self.heads = [m for m in model.modules() if isinstance(m, VocabParallelHead)]
        if not self.heads:
            raise ValueError("VocabParallelLoss: the model has no vocabulary-parallel head (apply_tensor_parallel first)")

    @contextmanager
    def local_logits(self) -> Iterator[None]:
        """Inside: the heads return this rank's (B, T, V/N) logits instead of gathering them."""
        for head in self.heads:
            head.gather_output = False
        try:
            yield
        finally:
            for head in self.heads:
                del head.gather_output  # back to the class default: gathered

    def __call__(self, model: Callable[..., Any], input_ids: torch.Tensor, *, labels: torch.Tensor,
                 **kwargs: Any) -> torch.Tensor:
        with self.local_logits():
            logits = model(input_ids, **kwargs).logits
        return vocab_parallel_loss(logits, labels)


def shard(tensor: torch.Tensor, split: Split, rank: int, tp: int) -> torch.Tensor:
    """This rank's piece of every component of ``tensor`` along ``split.dim``, concatenated."""
    if sum(split.sizes) != tensor.size(split.dim):
        raise ValueError(f"components {split.sizes} do not add up to dim {split.dim} of shape {tuple(tensor.shape)}")
    pieces, offset = [], 0
    for size in split.sizes:
        if size % tp:
            raise ValueError(f"a component of width {size} cannot be split over {tp} ranks")
        part = size // tp
        pieces.append(tensor.narrow(split.dim, offset + rank * part, part))
        offset += size
    return torch.cat(pieces, dim=split.dim).contiguous()


def unshard(parts: list[torch.Tensor], split: Split) -> torch.Tensor:
    """The inverse of ``shard``: the full tensor from every rank's piece (in rank order)."""
    tp = len(parts)
    widths = [size // tp for size in split.sizes]
    per_rank = [p.split(widths, dim=split.dim) for p in parts]
    return torch.cat([per_rank[r][i] for i in range(len(widths)) for r in range(tp)], dim=split.dim)


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (module.get_submodule(parent) if parent else module), leaf


class _Applier:
    def __init__(self, rank: int, tp: int, group: Any) -> None:
        self.rank, self.tp, self.group = rank, tp, group
        self.done: dict[int, nn.Parameter] = {}  # id of a full parameter -> its shard (tied weights)

    def param(self, module: nn.Module, path: str, split: Split) -> None:
        owner, leaf = _owner(module, path)
        old = getattr(owner, leaf)
        if old is None:  # an optional parameter this instance does not have (a conv bias)
            return
        new = self.done.get(id(old))
        if new is None:
            new = nn.Parameter(shard(old.detach(), split, self.rank, self.tp), requires_grad=old.requires_grad)
            new.__dict__.update(old.__dict__)  # _is_residual_projection, _no_weight_decay, ...
            # Megatron's (and DeepSpeed's) marks: a sharded tensor, not counted tp times in a norm
            new.tensor_model_parallel, new.partition_dim, new.partition_stride = True, split.dim, 1
            new._tp_split = split
            self.done[id(old)] = new
        setattr(owner, leaf, new)

    def swap(self, module: nn.Module, path: str, base: type, cls: type) -> nn.Module:
        target = module.get_submodule(path) if path else module
        if type(target) is not base:
            raise TypeError(f"tensor-parallel plan: {path} is a {type(target).__name__}, expected {base.__name__}")
        target.__class__ = cls
        target.tp_group = self.group
        return target

    def apply(self, module: nn.Module, plan: TPPlan) -> None:
        for path, sizes in plan.column.items():
            self.param(module, f"{path}.weight", Split(0, sizes))
            self.param(module, f"{path}.bias", Split(0, sizes))
            self.swap(module, path, nn.Linear, ColumnParallelLinear).out_features = sum(sizes) // self.tp
        for path in plan.row:
            linear = module.get_submodule(path)
            self.param(module, f"{path}.weight", Split(1, (linear.in_features,)))
            self.swap(module, path, nn.Linear, RowParallelLinear).in_features = linear.in_features // self.tp
        for path, kind in plan.vocab.items():
            target = module.get_submodule(path)
            vocab = target.weight.size(0)  # still the full tensor: a tied head shares it with the embedding
            self.param(module, f"{path}.weight", Split(0, (vocab,)))
            if kind == "embedding":
                emb = self.swap(module, path, nn.Embedding, VocabParallelEmbedding)
                emb.num_embeddings, emb.vocab_start = vocab // self.tp, self.rank * (vocab // self.tp)
            else:
                if target.bias is not None:
                    self.param(module, f"{path}.bias", Split(0, (vocab,)))
                self.swap(module, path, nn.Linear, VocabParallelHead).out_features = vocab // self.tp
        for path, split in plan.split.items():
            self.param(module, path, split)
        for path in plan.partial_grad:
            module.get_parameter(path).register_hook(self._sum_over_ranks())
        for path, attrs in plan.local.items():
            target = module.get_submodule(path) if path else module
            for name, value in attrs.items():
                setattr(target, name, value)

    def _sum_over_ranks(self) -> Callable[[torch.Tensor], torch.Tensor]:
        group = self.group

        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            dist.all_reduce(grad, group=group)
            return grad

        return hook


def apply_tensor_parallel(model: nn.Module, groups: Any) -> nn.Module:
    """Split ``model`` in place over ``groups.tp_group`` (``process_groups.ParallelGroups``) by the
    plans of its modules; returns it. Call before building the optimizer (it replaces parameters)
    and before DeepSpeed wraps the model."""
    tp, rank = groups.tp_size, groups.tp_rank
    if tp == 1:
        return model
    modules = list(model.named_modules())
    missing = sorted({type(m).__name__ for _, m in modules if isinstance(m, Layer) and not has_plan(m)})
    if missing:
        raise NotImplementedError(f"no tensor-parallel plan for layer class(es) {', '.join(missing)}: "
                                  "add one in the family's tp_plan.py")
    # every plan reads the global sizes, so all are made before any module becomes local
    plans = [(m, plan_for(m, tp)) for _, m in modules if has_plan(m)]
    applier = _Applier(rank, tp, groups.tp_group)
    for module, plan in plans:
        applier.apply(module, plan)  # type: ignore[arg-type]
    return model


def full_tensors(model: nn.Module, groups: Any, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient, ``grads=True``) of a split model at its full shape, by name,
    on every rank: split ones gathered over the tensor-parallel ranks, others as they are."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            continue
        split = getattr(p, "_tp_split", None)
        if split is not None and groups.tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=groups.tp_group)
            t = unshard(parts, split)
        out[name] = t
    return out
