"""Building the pieces of a run from their config sections: seeds, model (+ ``init_from``), loaders.

Kept apart from the loop so the loop reads as the algorithm. Order matters for reproducibility:
seeds are set, the model is built (same weights on every rank, fresh or resumed), and only after
a restore are the RNG streams put back (``checkpoint.manager.apply_rng``).
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hmt.model import HMTLM
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.kinds import adapt_init_state, build_lm
from hybrid_lm.models.model_dir import load_model_dir
from hybrid_lm.models.recursive.convert import parameter_counts
from hybrid_lm.train.checkpoint import layout

#: (split, rank, world_size) -> a loader following the data contract (iterable of batches with
#: ``state_dict()`` / ``load_state_dict()``); the default builds ``hybrid_lm.data.loader.build_loader``.
LoaderFactory = Callable[[str, int, int], Iterable[dict[str, torch.Tensor]]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_loader_factory(data_cfg: Any) -> LoaderFactory:
    from hybrid_lm.data.loader import build_loader

    return lambda split, rank, world_size: build_loader(data_cfg, split, rank, world_size)


def tokenizer_file(data_cfg: Any) -> Optional[Path]:
    path = Path(getattr(data_cfg, "path", "") or ".") / "tokenizer.json"
    return path if path.is_file() else None


def check_tokenizer_fits(model_cfg: ModelConfig, tokenizer: Optional[Path], data_dir: Optional[Path] = None) -> None:
    """The tokenizer next to the shards must be the one their manifest records (``DataError``
    naming both), and the token ids it can produce must be rows of the embedding (a larger model
    vocab is fine: padding the vocab to a multiple of 64 is common). Without a ``tokenizer.json``
    the vocab size recorded in ``data_dir``'s manifest is checked instead. Runs before the model
    is built, so a mismatch costs no start-up time."""
    from hybrid_lm.data import manifest
    from hybrid_lm.data.tokenizer import Tokenizer
    from hybrid_lm.typed_config import ConfigError

    if tokenizer is not None:
        if (tokenizer.parent / manifest.FILE_NAME).is_file():
            base = str(tokenizer.parent)
            manifest.check_tokenizer_file(manifest.load_manifest(base), base)
        vocab, source = Tokenizer.load(tokenizer).vocab_size, str(tokenizer)
    elif data_dir is not None and (data_dir / manifest.FILE_NAME).is_file():
        recorded = manifest.load_manifest(str(data_dir)).get("tokenizer", {}).get("vocab_size")
        if recorded is None:
            return
        vocab, source = int(recorded), f"{data_dir / manifest.FILE_NAME}, no tokenizer.json beside it"
    else:
        return
    if vocab > model_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size: {model_cfg.vocab_size} is smaller than the tokenizer's {vocab} ids "
                          f"({source})")


def _init_state_dict(source: Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights from a training checkpoint/run, or else a model-only dir (``hybrid-lm import``)."""
    is_training = (source / layout.MARKER).is_file() or bool(layout.step_dirs(source)) or bool(
        layout.step_dirs(source / "checkpoints"))
    if is_training:
        from hybrid_lm.train.checkpoint import load_model_state

        loaded = load_model_state(source)
        other, state = loaded.model_config, loaded.state_dict
    else:
        other, state, _ = load_model_dir(source)
    if other != model_cfg:
        print(f"[init_from] note: {source} was saved with a different model config; loading strictly anyway",
              file=sys.stderr, flush=True)
    return state


def load_init_state(model_cfg: ModelConfig, init_from: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``train.init_from``'s weights under this model's names, and the keys that may keep their
    seeded init (an HMT model's own weights when the source is a plain stack)."""
    return adapt_init_state(model_cfg, _init_state_dict(Path(init_from), model_cfg))


def check_init_keys(model_cfg: ModelConfig, init_from: str, missing: Iterable[str], unexpected: Iterable[str],
                    may_stay: set[str]) -> None:
    """Raise naming what ``init_from`` lacks (or has extra) for this model; a tied head may be
    absent (it is saved once, under the embedding's name)."""
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model_cfg.tie_embeddings)
               and k not in may_stay]
    unexpected = list(unexpected)
    if missing or unexpected:
        raise RuntimeError(f"train.init_from={init_from}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")


def build_model(model_cfg: ModelConfig, *, seed: int, init_from: Optional[str], resuming: bool,
                meta: bool = False) -> torch.nn.Module:
    """The model of ``model_cfg``'s kind (``models/kinds.py``) with identical weights on every rank:
    seeded init, then ``init_from`` weights unless a checkpoint is about to overwrite them anyway
    (an HMT model also takes a plain stack's weights as its backbone).

    ``meta=True``: a plain stack, or an HMT model over one, comes back on the meta device, without
    storage, for the engine to split and then materialise from ``seed`` and load ``init_from``
    into, piece by piece (``train/meta_init.py``); the weights are the same."""
    if meta:
        with torch.device("meta"):
            model = build_lm(model_cfg)
        if type(model) in (HybridLM, HMTLM):  # the kinds meta_init.materialize initialises
            return model
    seed_everything(seed)
    model = build_lm(model_cfg)
    if init_from and not resuming:
        state, may_stay = load_init_state(model_cfg, init_from)
        missing, unexpected = model.load_state_dict(state, strict=False)
        check_init_keys(model_cfg, init_from, missing, unexpected, may_stay)
    # the loader and every later draw start from the same streams whether or not weights were loaded
    seed_everything(seed)
    return model


def model_summary(model: torch.nn.Module, seq_len: int) -> str:
    """One line for the run's log: parameters and forward FLOPs per token; for a looped model the
    unique (stored, optimised) parameters beside the unrolled ones a plain stack of its depth holds."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    line = (f"[model] {config.kind} {config.block_pattern!r}: {params:,} parameters, "
            f"{model.flops_per_token(seq_len) / 1e6:.2f} MFLOPs/token forward at seq_len {seq_len}")
    if getattr(model, "loops", 1) > 1:
        counts = parameter_counts(model)
        line += (f"; block x {model.loops} loops: {counts['unique']:,} unique ({counts['lora']:,} LoRA), "
                 f"{counts['unrolled']:,} unrolled")
    return line
