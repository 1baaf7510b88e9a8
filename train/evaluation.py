"""Eval hooks: named evaluations the trainer runs every ``eval.every`` steps and when training ends.

    eval:
      every: 100
      hooks: [val_loss, position_loss, passkey, my_recall]
      plugins: [my_evals]          # a module of yours whose @register_eval_hook("my_recall") runs on import

When they run (train/loop.py): after the last step (``train.steps``) always, whether or not it is
a multiple of ``every``; every ``every`` steps when ``every > 0``; before the first step of a fresh
run when ``train.eval_at_start``. So ``every: 0`` means the final eval only (plus the start one).
``hooks: []`` turns evaluation off. A run stopped early (``train.stop_at``, SIGTERM) has not ended
and gets no final eval; the run that resumes it to ``train.steps`` does.

A hook is a function ``(model, ctx, cfg) -> dict[str, float]`` registered by name with
``@register_eval_hook("name")``; later evals (associative recall, ...) plug in the same way and are
selected by name from the config. Hooks outside this package are found through ``eval.plugins``:
module names imported (from ``sys.path``; set PYTHONPATH for a module next to your config) before
the names in ``hooks`` are looked up. Built in:

* ``val_loss``: token-weighted mean cross-entropy over labels != -100 on the validation split
  (``val_loss``) and its perplexity (``val_ppl``).
* ``position_loss``: the same loss in ``position_buckets`` equal-width buckets of the position in
  the sequence (``position_loss/0-255``, ...). Long-context degradation shows as late buckets that
  stop improving, which a single mean hides.
* ``passkey``: greedy retrieval of a 5-digit pass key hidden in filler text at the lengths in
  ``eval.passkey_lengths`` and the depths in ``eval.passkey_depths`` (``passkey/1024`` = accuracy).
  Prompts are built in tokens of the data's tokenizer (``ctx.tokenizer``, else the
  ``tokenizer.json`` next to the validation shards, else bytes), so byte-level and BPE runs alike;
  a hit is a continuation that starts with the key's digits.
* ``long_context`` (train/long_context_eval.py): loss, state RMS per layer/head and Mamba-2's mean
  decay by position on one validation stream of ``long_context_factor`` x the training length.

Cross-rank reduction goes through ``ctx.reduce(numerator_sum, count)`` -> the sums over ranks, so
every score is a ratio of global sums (token weighting survives ranks with unequal token counts).
"""
from __future__ import annotations

import importlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.typed_config import ConfigError

Batch = dict[str, torch.Tensor]
Hook = Callable[[nn.Module, "EvalContext", "EvalConfig"], dict[str, float]]


@dataclass
class EvalConfig:
    every: int = 0
    """also run the hooks every N optimizer steps; they always run once when training ends
    (after ``train.steps``), so 0 means only then (and at the start with ``train.eval_at_start``)"""
    hooks: list[str] = field(default_factory=lambda: ["val_loss", "position_loss"])
    """names of registered eval hooks to run, in order ([] turns evaluation off)"""
    plugins: list[str] = field(default_factory=list)
    """modules to import before ``hooks`` are looked up, so that their ``@register_eval_hook``
    calls run (``[my_evals]``: your own hooks without editing hybrid-lm; found on ``sys.path``)"""
    max_batches: Optional[int] = None
    """validation batches per rank per evaluation (None: the whole split)"""
    position_buckets: int = 8
    """position_loss: equal-width buckets over the sequence length"""
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 1024])
    """passkey: prompt lengths in tokens of the data's tokenizer (bytes for a byte-level one)"""
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    """passkey: where the key sits, as a fraction of the filler before it"""
    long_context_factor: int = 16
    """long_context: length of its validation stream in multiples of the validation rows' length"""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every: must be >= 0, got {self.every}")
        if self.long_context_factor < 1:
            raise ConfigError(f"eval.long_context_factor: must be >= 1, got {self.long_context_factor}")
        if self.position_buckets < 1:
            raise ConfigError(f"eval.position_buckets: must be >= 1, got {self.position_buckets}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"eval.max_batches: must be >= 1 or null, got {self.max_batches}")
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths):
            raise ConfigError(f"eval.passkey_depths: every depth must be in [0, 1], got {self.passkey_depths}")
        shortest = passkey_min_length()
        if any(n < shortest for n in self.passkey_lengths):
            raise ConfigError(f"eval.passkey_lengths: every length must hold the needle and question "
                              f"(>= {shortest} bytes), got {self.passkey_lengths}")


@dataclass
class EvalContext:
    make_val_loader: Callable[[], Iterable[Batch]]
    """a fresh validation loader for this rank"""
    device: torch.device
    """where the model lives; batches are moved here"""
    step: int
    """the optimizer step being evaluated (seeds the passkey prompts)"""
    reduce: Optional[Callable[[float, float], tuple[float, float]]] = None
    """(sum, count) on this rank -> (sum, count) over the data-parallel ranks; identity when None"""
    tokenizer: Optional[Any] = None
    """the data's tokenizer (``hybrid_lm.data.tokenizer.Tokenizer``) for prompts; None: the one next
    to the validation shards, or bytes when there is none"""

    def sum_over_ranks(self, total: float, count: float) -> tuple[float, float]:
        return self.reduce(total, count) if self.reduce is not None else (total, count)


_HOOKS: dict[str, Hook] = {}


def register_eval_hook(name: str) -> Callable[[Hook], Hook]:
    """Decorator: make ``fn(model, ctx, cfg) -> dict[str, float]`` selectable as ``eval.hooks: [name]``."""
    def wrap(fn: Hook) -> Hook:
        if name in _HOOKS and _HOOKS[name] is not fn:
            raise ValueError(f"eval hook {name!r} is already registered ({_HOOKS[name].__module__})")
        _HOOKS[name] = fn
        return fn

    return wrap


def eval_hooks() -> dict[str, Hook]:
    """The registered hooks by name."""
    return dict(_HOOKS)


def import_plugins(modules: Sequence[str]) -> None:
    """Import each of ``modules`` (``eval.plugins``) so the hooks they register become known."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken plugin must name itself at start-up, not fail as a bare traceback
            raise ConfigError(f"eval.plugins: cannot import {name!r} ({type(exc).__name__}: {exc}); plugins are "
                              f"module names importable from sys.path (add their folder to PYTHONPATH)") from exc


def resolve_hooks(cfg: EvalConfig) -> list[tuple[str, Hook]]:
    """The hooks named in ``cfg.hooks``, in order, after importing ``cfg.plugins``; ConfigError
    names an unknown hook and lists the known ones. Cheap to repeat (imports are cached)."""
    import_plugins(cfg.plugins)
    unknown = [h for h in cfg.hooks if h not in _HOOKS]
    if unknown:
        hint = "" if cfg.plugins else "; a hook of your own needs its module in eval.plugins"
        raise ConfigError(f"eval.hooks: unknown hook {unknown[0]!r} (known: {', '.join(sorted(_HOOKS))}){hint}")
    return [(name, _HOOKS[name]) for name in cfg.hooks]


def run_evals(model: nn.Module, cfg: EvalConfig, ctx: EvalContext) -> dict[str, float]:
    """Run every hook named in ``cfg.hooks`` in eval mode without gradients; restores the train mode."""
    hooks = resolve_hooks(cfg)
    was_training = model.training
    model.eval()
    scores: dict[str, float] = {}
    try:
        with torch.no_grad():
            for _, hook in hooks:
                scores.update(hook(model, ctx, cfg))
    finally:
        model.train(was_training)
    return scores


def token_losses(model: nn.Module, ctx: EvalContext, cfg: EvalConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (per-token loss (B, T) float32, mask (B, T) bool of labels != -100) per validation batch."""
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
    for loss, mask in token_losses(model, ctx, cfg):
        total += float(loss[mask].double().sum())
        count += float(mask.sum())
    total, count = ctx.sum_over_ranks(total, count)
    if count == 0:
        raise RuntimeError("val_loss: the validation split yielded no labelled tokens")
    mean = total / count
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0))}  # exp overflows past ~709


@register_eval_hook("position_loss")
def position_loss(model: nn.Module, ctx: EvalContext, cfg: EvalConfig) -> dict[str, float]:
    sums = torch.zeros(0, dtype=torch.float64)
    counts = torch.zeros(0, dtype=torch.float64)
    for loss, mask in token_losses(model, ctx, cfg):
        t = loss.shape[1]
        if t > sums.numel():  # a longer batch than seen so far: extend the per-position sums
            sums = torch.cat([sums, sums.new_zeros(t - sums.numel())])
            counts = torch.cat([counts, counts.new_zeros(t - counts.numel())])
        sums[:t] += (loss * mask).sum(0).double().cpu()
        counts[:t] += mask.sum(0).double().cpu()
    seq_len = sums.numel()
    if seq_len == 0:
        return {}
    n = min(cfg.position_buckets, seq_len)
    edges = [i * seq_len // n for i in range(n + 1)]
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        s, c = ctx.sum_over_ranks(float(sums[lo:hi].sum()), float(counts[lo:hi].sum()))
        if c > 0:
            out[f"position_loss/{lo}-{hi - 1}"] = s / c
    return out


_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_QUESTION = "What is the pass key? The pass key is "


_KEYS = range(10000, 100000)  # five digits: every needle has the same length


def _needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_min_length() -> int:
    """The shortest ``eval.passkey_lengths`` entry: a prompt with no filler."""
    return len(_needle(_KEYS[0])) + len(_QUESTION)


def passkey_prompt(length: int, depth: float, key: int) -> tuple[str, str]:
    """An ASCII prompt of ``length`` bytes hiding ``key`` after ``depth`` of the filler; returns (prompt, answer)."""
    needle = _needle(key)
    room = length - len(needle) - len(_QUESTION)
    if room < 0:
        raise ConfigError(f"eval.passkey_lengths: {length} is shorter than the needle and question "
                          f"({len(needle) + len(_QUESTION)} bytes)")
    filler = (_FILLER * (room // len(_FILLER) + 1))[:room]
    cut = int(depth * room)
    return filler[:cut] + needle + filler[cut:] + _QUESTION, str(key)


def _vocab_size(model: nn.Module, device: torch.device) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:  # no config: ask the model itself
        vocab = model(torch.zeros(1, 1, dtype=torch.long, device=device)).logits.shape[-1]
    return int(vocab)


def greedy_continuation(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids (1, T) -> the next ``n`` greedy tokens (n,): ``model.generate`` when it has one, else an
    argmax loop over full forwards (quadratic, fine for the short answers decoded here)."""
    if hasattr(model, "generate"):
        return model.generate(ids, max_new_tokens=n)[0, ids.shape[1]:]
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[0, -n:]


def passkey_prompt_ids(tokenizer: Any, length: int, depth: float, key: int) -> tuple[list[int], str]:
    """A prompt of exactly ``length`` tokens of ``tokenizer`` hiding ``key`` after ``depth`` of the
    filler (needle, filler and question encoded apart, so the count is exact for BPE too); returns
    (ids, answer). For a byte-level tokenizer these are the bytes of ``passkey_prompt``."""
    needle, question = tokenizer.encode(_needle(key)), tokenizer.encode(_QUESTION)
    room = length - len(needle) - len(question)
    if room < 0:
        raise ConfigError(f"eval.passkey_lengths: {length} tokens is shorter than the needle and question "
                          f"({len(needle) + len(question)} tokens)")
    per_copy = max(1, len(tokenizer.encode(_FILLER)))
    filler = tokenizer.encode(_FILLER * (room // per_copy + 2))[:room]
    cut = int(depth * room)
    return filler[:cut] + needle + filler[cut:] + question, str(key)


def eval_tokenizer(ctx: EvalContext) -> Any:
    """``ctx.tokenizer``, else the ``tokenizer.json`` next to the validation shards, else bytes."""
    from hybrid_lm.data.tokenizer import Tokenizer

    if ctx.tokenizer is not None:
        return ctx.tokenizer
    data_cfg = getattr(ctx.make_val_loader(), "cfg", None)
    path = getattr(data_cfg, "path", None)
    if path is not None:
        from hybrid_lm.data.loader import tokenizer_path

        if tokenizer_path(data_cfg).is_file():
            return Tokenizer.load(tokenizer_path(data_cfg))
    return Tokenizer.byte_level()


@register_eval_hook("passkey")
def passkey(model: nn.Module, ctx: EvalContext, cfg: EvalConfig) -> dict[str, float]:
    tok = eval_tokenizer(ctx)
    vocab = _vocab_size(model, ctx.device)
    need = 256 if tok.is_byte_level else tok.vocab_size  # byte prompts never use the special ids
    if vocab < need:
        raise ConfigError(f"eval.hooks: passkey prompts use the data's tokenizer ({need} ids"
                          f"{', byte-level' if tok.is_byte_level else ''}); this model's vocab is {vocab}")
    rng = random.Random(ctx.step)  # same keys on every rank and for a re-run of the same step
    out = {}
    for length in cfg.passkey_lengths:
        correct = 0
        for depth in cfg.passkey_depths:
            prompt, answer = passkey_prompt_ids(tok, length, depth, rng.randrange(_KEYS.start, _KEYS.stop))
            ids = torch.tensor([prompt], device=ctx.device)
            # a BPE tokenizer may split the digits differently after this prompt: decode a little more
            n = len(tok.encode(answer)) + (0 if tok.is_byte_level else 2)
            generated = greedy_continuation(model, ids, n).tolist()
            correct += tok.decode(generated).strip().startswith(answer)
        # every rank scored the same prompts, so the summed ratio is this rank's accuracy
        hits, total = ctx.sum_over_ranks(float(correct), float(len(cfg.passkey_depths)))
        out[f"passkey/{length}"] = hits / total if total else float("nan")
    return out


# the long-context hook registers itself on import; imported here so that its name is known wherever
# evaluation is (at the end: it imports this module's registry)
from hybrid_lm.train import long_context_eval  # noqa: E402,F401
