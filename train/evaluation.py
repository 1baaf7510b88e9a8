"""Eval hooks: named evaluations the trainer runs every ``eval.every`` steps and at the end.

    eval:
      every: 100
      hooks: [val_loss, position_loss, passkey]

A hook is a function ``(model, ctx, cfg) -> dict[str, float]`` registered by name with
``@register_eval_hook("name")``; later evals (associative recall, ...) plug in the same way and
are selected from the config. Built in:

* ``val_loss``: token-weighted mean cross-entropy on the validation split (``val/loss``) and its
  perplexity (``val/ppl``).
* ``position_loss``: the same loss bucketed by position in the sequence
  (``val/position_loss/0-63`` ...): where long-context ability degrades, the late buckets rise.
* ``passkey``: greedy retrieval of a 5-digit pass key hidden in filler text, at the lengths in
  ``eval.passkey_lengths`` (byte-level tokenizers only, ids == bytes).

Sums are reduced across data-parallel ranks with ``ctx.reduce`` (a mean over ranks; a ratio of
means is the ratio of sums, so token weighting survives).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]
Hook = Callable[[nn.Module, "EvalContext", "EvalConfig"], dict[str, float]]


@dataclass
class EvalConfig:
    every: int = 0
    """run the hooks every N optimizer steps (0: only when training ends)"""
    hooks: list[str] = field(default_factory=lambda: ["val_loss", "position_loss"])
    """names of registered eval hooks to run"""
    max_batches: Optional[int] = None
    """validation batches per rank per evaluation (None: the whole split)"""
    position_buckets: int = 8
    """position_loss: equal-width buckets over the sequence"""
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 512])
    """passkey: prompt lengths in tokens (bytes)"""
    passkey_trials: int = 4
    """passkey: prompts per length (depths spread evenly)"""


@dataclass
class EvalContext:
    make_val_loader: Callable[[], Iterable[Batch]]
    """a fresh validation loader for this rank"""
    device: torch.device
    step: int
    reduce: Optional[Callable[[float], float]] = None
    """mean of a float across data-parallel ranks (identity when None)"""

    def all_mean(self, value: float) -> float:
        return self.reduce(value) if self.reduce is not None else value


_HOOKS: dict[str, Hook] = {}


def register_eval_hook(name: str) -> Callable[[Hook], Hook]:
    def wrap(fn: Hook) -> Hook:
        _HOOKS[name] = fn
        return fn

    return wrap


def eval_hooks() -> dict[str, Hook]:
    return dict(_HOOKS)


def run_evals(model: nn.Module, cfg: EvalConfig, ctx: EvalContext) -> dict[str, float]:
    """Run every hook named in ``cfg.hooks`` in eval mode without gradients; restores train mode."""
    unknown = [h for h in cfg.hooks if h not in _HOOKS]
    if unknown:
        raise KeyError(f"eval.hooks: unknown hook {unknown[0]!r} (known: {', '.join(sorted(_HOOKS))})")
    was_training = model.training
    model.eval()
    scores: dict[str, float] = {}
    try:
        with torch.no_grad():
            for name in cfg.hooks:
                scores.update(_HOOKS[name](model, ctx, cfg))
    finally:
        model.train(was_training)
    return scores


def _token_losses(model: nn.Module, ctx: EvalContext, cfg: EvalConfig) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (per-token loss (B, T), mask (B, T)) over at most ``max_batches`` validation batches."""
    for i, batch in enumerate(ctx.make_val_loader()):
        if cfg.max_batches is not None and i >= cfg.max_batches:
            break
        ids = batch["input_ids"].to(ctx.device)
        labels = batch["labels"].to(ctx.device)
        extra = {k: batch[k].to(ctx.device) for k in ("doc_ids", "position_ids") if batch.get(k) is not None}
        logits = model(ids, **extra).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        yield loss.view_as(labels), labels != -100


@register_eval_hook("val_loss")
def val_loss(model: nn.Module, ctx: EvalContext, cfg: EvalConfig) -> dict[str, float]:
    total, count = 0.0, 0.0
    for loss, mask in _token_losses(model, ctx, cfg):
        total += float(loss[mask].sum())
        count += float(mask.sum())
    total, count = ctx.all_mean(total), ctx.all_mean(count)
    if count == 0:
        raise RuntimeError("val_loss: the validation split yielded no tokens")
    mean = total / count
    return {"val/loss": mean, "val/ppl": math.exp(min(mean, 50.0))}


@register_eval_hook("position_loss")
def position_loss(model: nn.Module, ctx: EvalContext, cfg: EvalConfig) -> dict[str, float]:
    sums: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    seq_len = 0
    for loss, mask in _token_losses(model, ctx, cfg):
        seq_len = loss.shape[1]
        if sums is None:
            sums = torch.zeros(seq_len, dtype=torch.float64)
            counts = torch.zeros(seq_len, dtype=torch.float64)
        sums += (loss * mask).sum(0).double().cpu()
        counts += mask.sum(0).double().cpu()
    if sums is None or counts is None:
        return {}
    n = max(1, min(cfg.position_buckets, seq_len))
    edges = [round(i * seq_len / n) for i in range(n + 1)]
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        s, c = ctx.all_mean(float(sums[lo:hi].sum())), ctx.all_mean(float(counts[lo:hi].sum()))
        if c > 0:
            out[f"val/position_loss/{lo}-{hi - 1}"] = s / c
    return out


_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(length: int, depth: float, key: int) -> tuple[str, str]:
    """A prompt of ``length`` bytes hiding ``key`` at relative ``depth``; returns (prompt, answer)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is "
    room = max(0, length - len(needle) - len(question))
    filler = (_FILLER * (room // len(_FILLER) + 1))[:room]
    cut = int(depth * room)
    return filler[:cut] + needle + filler[cut:] + question, str(key)


@register_eval_hook("passkey")
def passkey(model: nn.Module, ctx: EvalContext, cfg: EvalConfig) -> dict[str, float]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    if vocab < 256 or not hasattr(model, "generate"):
        raise RuntimeError("passkey eval needs a byte-level model (vocab >= 256, ids == bytes) with generate()")
    rng = random.Random(ctx.step)
    out = {}
    for length in cfg.passkey_lengths:
        correct = 0
        for trial in range(cfg.passkey_trials):
            depth = (trial + 0.5) / cfg.passkey_trials
            prompt, answer = passkey_prompt(length, depth, rng.randrange(10000, 100000))
            ids = torch.tensor([list(prompt.encode())], device=ctx.device)
            generated = model.generate(ids, max_new_tokens=len(answer))[0, ids.shape[1]:]
            text = bytes(t for t in generated.tolist() if t < 256).decode(errors="replace")
            correct += text == answer
        out[f"val/passkey/{length}"] = ctx.all_mean(correct / cfg.passkey_trials)
    return out
