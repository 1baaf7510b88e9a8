"""Numerical stability of every layer letter at its defaults, at realistic lengths.

The Titans letters once gave a NaN loss at initialisation beyond ~64 tokens: the inner loop
diverged at the default gates, and the tests only used short inputs or small hand-set gates. These
tests use the defaults exactly as a user gets them (``ModelConfig(d_model=..., layer_pattern=...)``),
random ids and real text, 2,048 tokens, two widths, forward and backward; and a 16K-token stream
through each memory layer, whose state norm must stay inside the bound stated in
``kernels/titans/chunked.py`` (with decay) or grow no faster than it allows (``D``: no decay).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hybrid_lm.data.corpus import stdlib_root
from hybrid_lm.models.common.registry import layer_specs
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.titans.memory import NeuralMemory

SEQ = 2048
MIXERS = [letter for letter in layer_specs() if letter != "-"]
MEMORY_LETTERS = ["T", "C", "G", "L", "X", "D"]


def real_text(length: int, offset: int = 0) -> torch.Tensor:
    """Bytes of the standard library's own sources: text every machine has."""
    data = b""
    for path in sorted(Path(stdlib_root()).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= offset + length:
            break
    return torch.tensor(list(data[offset : offset + length]), dtype=torch.long)


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels as the loader gives them: the next token, -100 after the last."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def test_every_mixer_letter_is_covered() -> None:
    assert set(MEMORY_LETTERS) <= set(MIXERS) and {"A", "M"} <= set(MIXERS)


@pytest.mark.slow
@pytest.mark.parametrize("d_model", [64, 128])
@pytest.mark.parametrize("letter", MIXERS)
def test_defaults_finite_forward_backward_2048_tokens(letter: str, d_model: int) -> None:
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=258, d_model=d_model, layer_pattern=f"{letter}-"))
    ids = torch.stack([torch.randint(0, 256, (SEQ,)), real_text(SEQ)])
    loss = model(ids, labels=next_token_labels(ids)).loss
    assert torch.isfinite(loss), (letter, d_model, loss)
    # near the uniform-prediction loss at init: a layer that has blown up but stayed finite is off
    assert abs(loss.item() - math.log(258)) < 1.0, loss.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (letter, d_model, name)


def memory_layers(model: HybridLM) -> list[NeuralMemory]:
    return [m for m in model.modules() if isinstance(m, NeuralMemory)]


@pytest.mark.slow
@pytest.mark.parametrize("letter", MEMORY_LETTERS)
def test_memory_state_bounded_over_16k_token_stream(letter: str) -> None:
    """Stream 16,384 tokens of real text through the layer in 1,024-token calls, carrying the
    state, and check every memory's weights against the bound the soft clamp guarantees.

    With the clamp G (``titans.max_grad_norm``) every per-token write has norm <= theta_max * G,
    so the momentum obeys ||S|| <= theta_max G / (1 - eta_max) and the weights
    ||W_t|| <= ||W_0|| + ||S||_max / alpha_min (eta_max, alpha_min: the extreme gates the run
    saw). Without a forget gate (``D``) the weights can grow only linearly:
    ||W_t|| <= ||W_0|| + t * theta_max * G.
    """
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, d_model=64, layer_pattern=f"{letter}-")
    model = HybridLM(cfg).eval()
    mems = memory_layers(model)
    assert mems and all(m.spec.max_grad_norm is not None for m in mems)
    gates: dict[int, dict[str, list[float]]] = {id(m): {"eta": [], "alpha": []} for m in mems}

    # the extreme gates the run sees, recorded where the layer computes them
    for m in mems:
        original = m.project

        def wrapped(x, state, doc_ids, _m=m, _orig=original):  # type: ignore[no-untyped-def]
            inputs, tails = _orig(x, state, doc_ids)
            gates[id(_m)]["eta"].append(inputs["eta"].max().item())
            gates[id(_m)]["alpha"].append(inputs["alpha"].min().item())
            return inputs, tails

        m.project = wrapped  # type: ignore[method-assign]
    text = real_text(16 * 1024)[None]
    states = None
    norms: list[dict[str, float]] = []
    with torch.no_grad():
        for start in range(0, text.size(1), 1024):
            out = model(text[:, start : start + 1024], states=states, return_states=True)
            assert torch.isfinite(out.logits).all(), (letter, start)
            states = out.states
            norms.append({k: v.norm().item() for k, v in states[0].items() if k.split(".")[-1][:1] == "w"})
    final = norms[-1]
    assert final and all(math.isfinite(v) for v in final.values()), final
    for mem in mems:
        spec = mem.spec
        w0 = sum(w.norm().item() for w in mem.w0)
        eta_max = max(gates[id(mem)]["eta"]) if spec.momentum else 0.0
        assert spec.ns_steps == 0  # Muon writes theta * NS(S), bounded differently; no default uses it
        # one write per memory layer and head, each of norm <= theta_max * G
        per_write = spec.theta_max * spec.max_grad_norm * math.sqrt(len(mem.w0) * spec.n_heads)
        s_max = per_write / (1.0 - eta_max)
        for step, row in enumerate(norms):
            total = math.sqrt(sum(v * v for v in row.values()))
            if spec.decay:
                alpha_min = min(gates[id(mem)]["alpha"])
                bound = w0 + s_max / alpha_min
            else:
                bound = w0 + (step + 1) * 1024 * s_max
            assert total <= bound, (letter, step, total, bound)
    # and the memory is alive, not decayed to nothing: reads still depend on what was written
    assert max(final.values()) > 1e-3, final


def _grad_norm_at_init(pattern: str, ids: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=258, d_model=192, layer_pattern=pattern))
    model(ids, labels=next_token_labels(ids)).loss.backward()
    return math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters() if p.grad is not None))


@pytest.mark.slow
def test_outer_gradient_at_init_is_like_a_mamba_hybrids() -> None:
    """A memory whose inner loop is unstable can keep a bounded state (the clamp sees to that) and
    still have an outer gradient that grows chunk by chunk: at theta_max 1.0 a tiny.yaml-wide
    ``M-C-M-A-`` had a gradient norm of 8.8e3 at init, 900x that of ``M-M-A-``, and went NaN within
    50 steps. At the defaults every memory letter's model must stay within 5x of the same stack with
    Mamba-2 in its place (measured 1.5x for C, 2x for X)."""
    ids = torch.stack([real_text(512), real_text(512, offset=100_000)])
    base = _grad_norm_at_init("M-M-M-A-", ids)
    for letter in MEMORY_LETTERS:
        norm = _grad_norm_at_init(f"M-{letter}-M-A-", ids)
        assert math.isfinite(norm) and norm < 5 * base, (letter, norm, base)
