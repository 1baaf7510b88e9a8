"""Learning check: the neural memory solves associative recall beyond the attention window.

Task: ``N_PAIRS`` (6) random key->value pairs (keys and values from disjoint vocabularies), then
the same pairs asked again in a shuffled order; accuracy is measured on the values of the query
half. A gap of ``GAP`` (4) filler tokens separates the halves, so every query is at least 5
tokens after the pair it asks for, out of reach of the attention window (4: a token and the 3
before it), and only a memory can answer. The model is one MAL block (pattern ``L-``: memory,
then sliding-window attention, then an MLP); the baseline is the same model with that MAL layer
replaced by plain sliding-window attention of the same window and persistent tokens.
"""
from __future__ import annotations

import pytest
import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.titans.attention import SlidingWindowAttention, WindowAttentionLayer

N_KEYS, N_PAIRS, GAP = 16, 6, 4
FILLER = 2 * N_KEYS  # token id of the gap filler


def batch(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.stack([torch.randperm(N_KEYS, generator=gen)[:N_PAIRS] for _ in range(size)])
    vals = N_KEYS + torch.randint(0, N_KEYS, (size, N_PAIRS), generator=gen)
    order = torch.stack([torch.randperm(N_PAIRS, generator=gen) for _ in range(size)])
    first = torch.stack([keys, vals], dim=2).flatten(1)
    second = torch.stack([keys.gather(1, order), vals.gather(1, order)], dim=2).flatten(1)
    gap = torch.full((size, GAP), FILLER)
    ids = torch.cat([first, gap, second], dim=1)
    labels = torch.full_like(ids, -100)
    q0 = 2 * N_PAIRS + GAP
    labels[:, q0:-1:2] = ids[:, q0 + 1 :: 2]  # predict each queried value
    return ids, labels


def train_and_eval(swap_memory_out: bool) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=2 * N_KEYS + 1, d_model=64, layer_pattern="L-")
    t = cfg.titans
    # the memory at its defaults (depth 2, chunk 16, gates, clamp); only the attention window is
    # the task's: it must not reach from a query back to its pair
    t.window = 4
    model = HybridLM(cfg)
    if swap_memory_out:
        model.blocks[0].layer = WindowAttentionLayer(SlidingWindowAttention(64, 4, t.window, t.n_persistent, t.rope_base))
        model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(1500):
        ids, labels = batch(gen, 32)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, labels = batch(torch.Generator().manual_seed(2), 256)
    with torch.no_grad():
        pred = model(ids).logits.argmax(-1)
    mask = labels != -100
    return (pred[mask] == labels[mask]).float().mean().item()


@pytest.mark.slow
def test_memory_beats_sliding_window_on_recall() -> None:
    with_memory = train_and_eval(swap_memory_out=False)
    without = train_and_eval(swap_memory_out=True)
    # chance is 1/16; the window cannot see any pair from the query half. Measured with the memory
    # at its defaults (theta_max 0.2, gradient soft clamp 1.0, depth 2, chunk 16) after 1500 steps:
    # 0.472 and 0.460 for torch seeds 0 and 1 (2026-12-04; theta_max 1.0 gave 0.449, 0.452, 0.497
    # for seeds 0-2, theta_max 0.1 gave 0.10); the hand-set gates this test used before (chunk 4,
    # depth 1, little momentum) gave 0.41-0.44 at seed 0, and the baseline 0.05. The bar, 5x
    # chance, sits 0.16 below the lowest seed.
    assert without < 0.1, without
    assert with_memory > 0.3, (with_memory, without)
