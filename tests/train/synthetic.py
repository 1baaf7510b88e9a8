"""A tiny in-memory loader that follows the data contract, for engine tests that must not depend on
shards: batches of ``input_ids``/``labels``/``position_ids``/``doc_ids`` (B, T) int64, a cursor in
``state_dict()``, rank sharding by global sample index, the train split endless, the val split one pass.

The text is learnable by any model (even MLP-only): each next token is a fixed permutation of the
current one 90% of the time, so the loss drops well below the uniform log(V) within a few dozen steps.
Sample ``i`` depends only on (seed, i), so rank layouts that cover the same global samples per step
(2 ranks x 1 micro-batch vs 1 rank x 2 micro-batches) see the same data.
"""
from __future__ import annotations

from typing import Iterator

from pathlib import Path

import torch


class SyntheticLoader:
    def __init__(self, split: str, rank: int, world_size: int, *, vocab: int = 64, seq_len: int = 32,
                 batch_size: int = 2, seed: int = 0, val_batches: int = 4) -> None:
        self.split, self.rank, self.world_size = split, rank, world_size
        self.vocab, self.seq_len, self.batch_size, self.seed = vocab, seq_len, batch_size, seed
        self.val_batches = val_batches
        self.perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
        self.cursor = 0  # batches this rank has yielded
        self.stats = {"batches": 0}

    def _sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + (10**9 if self.split == "val" else 0))
        tokens = torch.empty(self.seq_len + 1, dtype=torch.long)
        tokens[0] = int(torch.randint(self.vocab, (1,), generator=g))
        noise = torch.rand(self.seq_len, generator=g) < 0.1
        rand = torch.randint(self.vocab, (self.seq_len,), generator=g)
        for t in range(self.seq_len):
            tokens[t + 1] = rand[t] if noise[t] else self.perm[tokens[t]]
        return tokens

    def _batch(self, n: int) -> dict[str, torch.Tensor]:
        first = (n * self.world_size + self.rank) * self.batch_size
        rows = torch.stack([self._sample(first + b) for b in range(self.batch_size)])
        B, T = self.batch_size, self.seq_len
        return {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
                "position_ids": torch.arange(T).expand(B, T).contiguous(),
                "doc_ids": torch.zeros(B, T, dtype=torch.long)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.split == "val":
            for n in range(self.val_batches):
                yield self._batch(n)
            return
        while True:
            batch = self._batch(self.cursor)
            self.cursor += 1
            self.stats["batches"] += 1
            yield batch

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])

    def remap_state_dicts(self, states: list) -> dict:
        """This rank's state from those of another data-parallel size (one per old rank): the old
        ranks consumed global batches [0, cursor * old world), which this layout continues."""
        cursors = {int(s["cursor"]) for s in states}
        consumed = cursors.pop() * len(states)
        if cursors or consumed % self.world_size:
            raise ValueError(f"cannot remap cursors {[s['cursor'] for s in states]} to {self.world_size} ranks")
        return {"cursor": consumed // self.world_size}


def factory(**kwargs):
    """A LoaderFactory for ``train(cfg, make_loader=...)``."""
    return lambda split, rank, world_size: SyntheticLoader(split, rank, world_size, **kwargs)


def job_dict(run_dir, *, steps: int = 8, zero_stage: int = 0, gas: int = 1, **sections) -> dict:
    """A JobConfig dict for a model of ~30k parameters on SyntheticLoader(vocab=64, seq_len=32, batch 2).

    MLP-only on purpose: these tests exercise the engine, not the families, and must stay fast.
    ``sections`` merge into the sections of the same name (``train={"stop_at": 4}``).
    """
    base = {
        "model": {"vocab_size": 64, "d_model": 32, "layer_pattern": "--"},
        "data": {"seq_len": 32, "micro_batch_size": 2, "path": str(Path(run_dir) / "no-shards")},
        "parallel": {"zero_stage": zero_stage, "gradient_accumulation": gas},
        "train": {"steps": steps, "run_dir": str(run_dir), "seed": 0, "eval_at_start": False},
        "checkpoint": {"every": 0, "keep": 2},
        "logging": {"every": 1, "tensorboard": False},
        "eval": {"every": 0},
        "schedule": {"warmup_steps": 2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base
