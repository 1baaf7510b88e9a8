"""Large models: build on the meta device, split, then allocate and initialise only this rank's share.

    with torch.device("meta"):
        model = HybridLM(cfg)                    # shapes only: no storage, no RNG draws
    apply_tensor_parallel(model, groups)          # meta shards (train/tensor_parallel.py)
    materialize(model, torch.device("cpu"), seed=seed, groups=groups)   # this rank's shards, initialised

A 7B model then never exists whole on one rank: each rank allocates its shards, and the largest
extra allocation is one full parameter (a draw is made at full size, then cut) or one full layer
(a layer's own ``reset_parameters`` runs on a full-size copy of that layer alone).

The weights are bitwise those of the eager path, ``torch.manual_seed(seed); HybridLM(cfg)`` and then
``apply_tensor_parallel``: ``materialize`` runs ``HybridLM.init_weights``'s steps in its order with
the same draws at full size (normal(0, init_std) for every matmul and embedding in module order,
zero biases, unit norms, the residual rescale, then each layer's ``reset_parameters``) and keeps
each rank's piece, so TP=2 starts from exactly the one-process weights. Every parameter is first
filled with NaN, so a parameter no step wrote fails loudly instead of training from garbage.
``tests/train/test_meta_init.py`` holds it to the eager model for every layer family.

Initialisation runs on ``device`` with that device's RNG: pass the CPU (as the eager path builds on
the CPU) for the same weights as a CPU-built model; ``parallelize`` moves the shards to the GPU.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hmt.model import HMTLM
from hybrid_lm.models.hybrid import Block, HybridLM
from hybrid_lm.train.build import seed_everything


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def to_empty(module: nn.Module, device: torch.device) -> None:
    """Uninitialised storage on ``device`` for every parameter and buffer of ``module``.

    Unlike ``nn.Module.to_empty`` (which makes new parameters from meta ones), keeps what the
    parameters carry: tied parameters stay one tensor, attributes stay (``_tp_split``,
    ``_keep_fp32``, ``_is_residual_projection``, ...) and gradient hooks are registered again
    (tensor parallelism's partial-gradient all-reduce)."""
    new_of: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            new = new_of.get(id(p))
            if new is None:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update({k: v for k, v in p.__dict__.items() if k != "_backward_hooks"})
                for hook in (getattr(p, "_backward_hooks", None) or {}).values():
                    new.register_hook(hook)
                new_of[id(p)] = new
            sub._parameters[name] = new
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty_like(b, device=device)


@torch.no_grad()
def materialize(model: HybridLM | HMTLM, device: torch.device, *, seed: int, groups: Any = None) -> HybridLM | HMTLM:
    """Storage on ``device`` for a model built on the meta device (split by tensor parallelism or
    not), initialised from ``seed`` as ``HybridLM(cfg)`` (or ``HMTLM(cfg)``: its backbone, then its
    own replicated parameters) after ``torch.manual_seed(seed)`` would be (and then split). Leaves
    the global RNGs seeded with ``seed``, as ``build.build_model`` does."""
    to_empty(model, device)
    for p in model.parameters():
        if p.is_floating_point():
            p.fill_(float("nan"))
    seed_everything(seed)
    stack = model.backbone if isinstance(model, HMTLM) else model
    split = any(getattr(p, "_tp_split", None) is not None for p in model.parameters())
    if split:
        if groups is None:
            raise ValueError("materialize: the model is split by tensor parallelism; pass its groups")
        _init_split(stack, groups.tp_rank, groups.tp_size)
    else:
        stack.init_weights()
    if isinstance(model, HMTLM):
        model.init_memory_weights()
    seed_everything(seed)
    unset = [n for n, p in model.named_parameters() if p.is_floating_point() and bool(p.isnan().any())]
    if unset:
        raise RuntimeError(f"materialize: no initialisation step wrote {', '.join(unset[:5])}"
                           f"{' ...' if len(unset) > 5 else ''} (add it to HybridLM.init_weights and here)")
    return model


def _cut(p: torch.Tensor, rank: int, tp: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from hybrid_lm.train.tensor_parallel import shard

    split = getattr(p, "_tp_split", None)
    return (lambda full: full) if split is None else (lambda full: shard(full, split, rank, tp))


def _full_shape(p: torch.Tensor) -> list[int]:
    split = getattr(p, "_tp_split", None)
    shape = list(p.shape)
    if split is not None:
        shape[split.dim] = sum(split.sizes)
    return shape


def _set(p: torch.Tensor, rank: int, tp: int, make: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> None:
    """Fill ``p`` (a shard or a replicated parameter) with its piece of ``make(full-size empty tensor)``."""
    full = torch.empty(_full_shape(p), dtype=p.dtype, device=p.device)
    make(full)
    p.copy_(_cut(p, rank, tp)(full))


def _init_split(model: HybridLM, rank: int, tp: int) -> None:
    """``HybridLM.init_weights`` step by step with full-size draws, keeping this rank's pieces."""
    config: ModelConfig = model.config
    std = config.init_std
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _set(module.weight, rank, tp, lambda t: nn.init.normal_(t, std=std))
            if module.bias is not None:
                _set(module.bias, rank, tp, nn.init.zeros_)
        elif isinstance(module, nn.Embedding):
            _set(module.weight, rank, tp, lambda t: nn.init.normal_(t, std=std))
        elif isinstance(module, nn.RMSNorm):
            _set(module.weight, rank, tp, nn.init.ones_)
    if config.rescale_prenorm_residual:
        scale = 1.0 / math.sqrt(config.n_blocks)
        for p in model.parameters():
            if getattr(p, "_is_residual_projection", False):
                p.mul_(scale)  # elementwise: scaling the piece equals cutting the scaled whole
    for i, block in enumerate(model.blocks):
        # the layer's own init on a full-size copy of this one layer; keep what it wrote
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            full = Block(config, i).layer
        device = next(block.parameters()).device
        to_empty(full, device)
        for p in full.parameters():
            p.data.fill_(float("nan"))
        full.reset_parameters()
        for name, value in full.named_parameters():
            written = ~value.isnan()
            if not bool(written.any()):
                continue  # left to the generic init above
            if not bool(written.all()):
                raise RuntimeError(f"materialize: blocks.{i}.layer.{name}: reset_parameters wrote part of it")
            local = block.layer.get_parameter(name)
            local.copy_(_cut(local, rank, tp)(value.detach()))


@torch.no_grad()
def load_full_state(model: nn.Module, state: dict[str, torch.Tensor], *, groups: Any = None) -> tuple[list[str], list[str]]:
    """Copy this rank's piece of each full-size tensor of ``state`` into ``model`` (split by tensor
    parallelism or not), one tensor at a time, so the model never exists whole here; -> (missing,
    unexpected) keys as ``load_state_dict(strict=False)`` reports them."""
    own = model.state_dict(keep_vars=True)
    rank, tp = (groups.tp_rank, groups.tp_size) if groups is not None else (0, 1)
    for name, target in own.items():
        full = state.get(name)
        if full is None:
            continue
        piece = _cut(target, rank, tp)(full.to(target.dtype))
        if piece.shape != target.shape:
            raise RuntimeError(f"{name}: saved shape {tuple(full.shape)} does not fit this model's "
                               f"{tuple(target.shape)} (this rank's piece)")
        target.copy_(piece)
    return [k for k in own if k not in state], [k for k in state if k not in own]
