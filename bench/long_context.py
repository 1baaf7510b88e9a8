"""State collapse on the embedded corpus, and what each mitigation does about it (Stuffed Mamba).

    python bench/long_context.py                 # the full run: about 10 minutes on 2 idle cores (559 s)
    python bench/long_context.py --quick         # CI smoke run (tests/bench/test_long_context_bench.py)
    python bench/long_context.py --d-state 128 --seq-len 64 --out runs/lc   # other sizes

What it does, all through the real trainer (ZeRO-0, the shard loader, byte-level stdlib corpus):

1. trains a small Mamba-2-heavy hybrid (``M-M-M-A-``, attention windowed to the training length
   L so only the Mamba-2 states can see further) at length L;
2. continues it for a short while (``--continue-steps``, about 15% of the base run here, 0.1% in
   the paper) with ``train.state_passing: carry`` on row streams, and, as the control that
   separates "more training" from "state passing", for as long on the same row streams without it;
3. evaluates every variant on the validation split read as long streams of 16L tokens: loss by
   position (buckets of L), and passkey retrieval at 1L, 2L, 4L, 8L (prompts in tokens of the
   shards' tokenizer, three depths, two keys each). Variants: no mitigation, each inference knob
   of ``model.mamba2`` (dt_mult, a_mult, decay_mult, b_mult, state_norm_max, state_window; each
   tuned over a few values on a tuning stream, reported on separate evaluation streams), and the
   two continued trainings.

It prints one table (loss at 1L, 4L, 16L, the mean over L..16L, and passkey accuracy per length)
and writes ``OUT/long_context.json`` and ``OUT/long_context.png`` (loss by position per variant).
Why these sizes: the spec's recipe for collapse is a state large relative to the training length
(Mamba-2's state per layer is d_inner x d_state = 8192 numbers here, against L = 128 tokens).
Record what you ran in bench/RESULTS.md, whether or not the mitigations help.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from hybrid_lm.data.tokenizer import Tokenizer
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.mamba2 import Mamba2
from hybrid_lm.train.evaluation import greedy_continuation, passkey_prompt_ids

KNOBS = ("dt_mult", "a_mult", "decay_mult", "b_mult", "state_norm_max", "state_window")
NEUTRAL = {"dt_mult": 1.0, "a_mult": 1.0, "decay_mult": 1.0, "b_mult": 1.0, "state_norm_max": None,
           "state_window": None}


@dataclass
class Setup:
    seq_len: int = 128
    d_model: int = 64
    d_state: int = 64
    pattern: str = "M-M-M-A-"
    batch: int = 16
    steps: int = 500
    continue_steps: int = 80
    streams: int = 6
    """evaluation streams of 16L tokens (plus one tuning stream)"""
    factor: int = 16
    passkey_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    passkey_keys: int = 2
    max_bytes: int = 6_000_000
    val_fraction: float = 0.05
    tune: bool = True


def quick_setup() -> Setup:
    return Setup(seq_len=128, d_model=32, d_state=16, batch=2, steps=4, continue_steps=2, streams=1, factor=4,
                 passkey_mults=[1], passkey_keys=1, max_bytes=300_000, val_fraction=0.3, tune=False)


def job(setup: Setup, shards: Path, run_dir: Path, steps: int, row_streams: bool = False, **train: object) -> dict:
    L = setup.seq_len
    return {
        "model": {"vocab_size": 258, "d_model": setup.d_model, "layer_pattern": setup.pattern,
                  "attention": {"n_heads": 4, "window": L},
                  "mamba2": {"d_state": setup.d_state, "headdim": 16, "chunk_size": 32}},
        "data": {"path": str(shards), "seq_len": L, "micro_batch_size": setup.batch,
                 "row_streams": row_streams},
        "optim": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1},
        "schedule": {"warmup_steps": max(1, steps // 10)},
        "checkpoint": {"every": 0, "keep": 1},
        "logging": {"every": max(1, steps // 5), "tensorboard": False},
        "eval": {"every": 0, "hooks": []},
        "train": {"steps": steps, "run_dir": str(run_dir), "seed": 0, "eval_at_start": False, **train},
    }


def run_training(setup: Setup, shards: Path, out: Path) -> dict[str, Path]:
    """Base run, then the two continued runs from its weights; the checkpoints by variant name."""
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    ckpts = {}
    start = time.perf_counter()
    # a run dir that already holds the finished run resumes with nothing to do: re-evaluating is cheap
    base = train(job_config_from_dict(job(setup, shards, out / "base", setup.steps)))
    ckpts["none"] = base.checkpoint
    print(f"[long-context] base: {setup.steps} steps, loss {base.losses.get(setup.steps - 1, float('nan')):.3f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    # both continuations read row streams: the same data in the same order, so the only difference
    # is the initial state (in plain order they would start over at the base run's first batches)
    lr_cont = {"init_from": str(base.checkpoint), "row_streams": True}
    for name, extra in (("continued", {}), ("state passing", {"state_passing": "carry"})):
        start = time.perf_counter()
        cfg = job(setup, shards, out / name.replace(" ", "_"), setup.continue_steps, **lr_cont, **extra)
        cfg["optim"]["lr"] = 1e-3
        result = train(job_config_from_dict(cfg))
        ckpts[name] = result.checkpoint
        print(f"[long-context] {name}: {setup.continue_steps} more steps, loss "
              f"{result.losses.get(setup.continue_steps - 1, float('nan')):.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    return ckpts


def load(ckpt: Path) -> HybridLM:
    from hybrid_lm.train.checkpoint import load_model_state

    loaded = load_model_state(ckpt)
    model = HybridLM(loaded.model_config)
    model.load_state_dict(loaded.state_dict)
    return model.eval()


def set_knobs(model: HybridLM, **knobs: object) -> None:
    for module in model.modules():
        if isinstance(module, Mamba2):
            for name in KNOBS:
                setattr(module, name, knobs.get(name, NEUTRAL[name]))


def long_streams(shards: Path, n: int, length: int) -> torch.Tensor:
    """``n`` disjoint streams of ``length`` + 1 tokens of the validation split, read in order: (n, length + 1)."""
    from hybrid_lm.data.config import DataConfig
    from hybrid_lm.data.loader import build_loader

    need = n * (length + 1)
    pieces, have = [], 0
    pad = Tokenizer.load(shards / "tokenizer.json").pad_id
    loader = build_loader(DataConfig(path=str(shards), seq_len=length + 1, micro_batch_size=1), "val")
    for batch in loader:
        ids = batch["input_ids"][0]
        pieces.append(ids[ids != pad])  # the split's last rows are padded
        have += pieces[-1].numel()
        if have >= need:
            break
    flat = torch.cat(pieces)
    while flat.numel() < need:
        flat = torch.cat([flat, flat])
    return flat[:need].view(n, length + 1)


@torch.no_grad()
def loss_by_position(model: HybridLM, streams: torch.Tensor, seg: int, reset: bool = False) -> list[float]:
    """Mean next-token loss in buckets of ``seg`` positions over (n, T+1) streams, run in segments of
    ``seg`` with states carried (one pass, by the layer contract), or with ``reset`` from zero states
    in every segment (the same tokens with at most ``seg`` tokens of context: the control that tells
    a loss rising with position because of the long context from one rising because of the text)."""
    inputs, targets = streams[:, :-1], streams[:, 1:]
    states, out = None, []
    for start in range(0, inputs.shape[1], seg):
        result = model(inputs[:, start:start + seg], states=states, return_states=True)
        states = None if reset else result.states
        out.append(float(F.cross_entropy(result.logits.float().flatten(0, 1), targets[:, start:start + seg].flatten())))
    return out


@torch.no_grad()
def passkey_accuracy(model: HybridLM, tok: Tokenizer, lengths: list[int], keys: int) -> dict[int, float]:
    import random

    rng = random.Random(0)
    acc = {}
    for length in lengths:
        hits = total = 0
        for depth in (0.1, 0.5, 0.9):
            for _ in range(keys):
                prompt, answer = passkey_prompt_ids(tok, length, depth, rng.randrange(10000, 100000))
                generated = greedy_continuation(model, torch.tensor([prompt]), len(answer)).tolist()
                hits += tok.decode(generated).strip().startswith(answer)
                total += 1
        acc[length] = hits / total
    return acc


def candidates(setup: Setup, base_norm: float) -> dict[str, list[dict]]:
    """Values to try per knob (the best on the tuning stream is reported)."""
    L = setup.seq_len
    grid = {
        "dt_mult": [{"dt_mult": v} for v in (1.5, 2.0, 4.0)],
        "a_mult": [{"a_mult": v} for v in (2.0, 4.0, 8.0)],
        "decay_mult": [{"decay_mult": v} for v in (0.99, 0.97, 0.9)],
        "b_mult": [{"b_mult": v} for v in (0.7, 0.5)],
        "state_norm_max": [{"state_norm_max": base_norm * f} for f in (0.5, 1.0, 2.0)],
        "state_window": [{"state_window": r} for r in (L, 2 * L)],
    }
    if not setup.tune:
        grid = {k: v[:1] for k, v in grid.items()}
    return grid


def head_norm_at(model: HybridLM, stream: torch.Tensor, length: int) -> float:
    """The largest per-head Frobenius norm of any Mamba-2 state after ``length`` tokens (the scale
    a state-norm bound is set from: what the model saw in training)."""
    with torch.no_grad():
        states = model(stream[None, :length], return_states=True).states
    norms = [s["ssm"].flatten(2).norm(dim=-1).max() for s in states if s is not None and "ssm" in s]
    return float(torch.stack(norms).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of well under a minute")
    parser.add_argument("--out", type=Path, default=None, help="where runs, JSON and PNG go (default: a temp dir)")
    parser.add_argument("--shards", type=Path, default=None, help="reuse these byte-level shards")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--d-state", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--continue-steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--streams", type=int, default=None)
    parser.add_argument("--passkey-keys", type=int, default=None)
    args = parser.parse_args()
    setup = quick_setup() if args.quick else Setup()
    for key in ("seq_len", "d_state", "steps", "continue_steps", "batch", "streams", "passkey_keys"):
        if getattr(args, key) is not None:
            setattr(setup, key, getattr(args, key))
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        run(setup, out, args.shards)


def run(setup: Setup, out: Path, shards: Optional[Path]) -> dict:
    from hybrid_lm.data.writer import build_shards

    t0 = time.perf_counter()
    L, n_tokens = setup.seq_len, setup.factor * setup.seq_len
    if shards is None:
        shards = out / "shards"
        if not (shards / "manifest.json").is_file():
            build_shards("stdlib", shards, max_bytes=setup.max_bytes, val_fraction=setup.val_fraction, progress=False,
                         shard_tokens=max(1 << 16, setup.max_bytes // 20))  # several shards: a val split
    print(f"[long-context] shards ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"[long-context] L={L}, d_model={setup.d_model}, d_state={setup.d_state}, pattern {setup.pattern}, "
          f"{setup.steps}+{setup.continue_steps} steps of {setup.batch}x{L}; eval to {setup.factor}L", flush=True)
    ckpts = run_training(setup, shards, out)
    tok = Tokenizer.load(shards / "tokenizer.json")
    data = long_streams(shards, setup.streams + 1, n_tokens)
    tune, evals = data[:1], data[1:]
    lengths = [m * L for m in setup.passkey_mults]

    def score(model: HybridLM, streams: torch.Tensor) -> float:
        return sum(loss_by_position(model, streams, L)[1:]) / (setup.factor - 1)  # mean past the training length

    variants: dict[str, tuple[Path, dict]] = {"no mitigation": (ckpts["none"], {})}
    base = load(ckpts["none"])
    norm_at_L = head_norm_at(base, tune[0], L)
    for knob, grid in candidates(setup, norm_at_L).items():
        best = min(grid, key=lambda kv: (set_knobs(base, **kv), score(base, tune))[1])
        variants[f"{knob}={list(best.values())[0]:.4g}"] = (ckpts["none"], best)
    variants["continued, no state passing"] = (ckpts["continued"], {})
    variants["state passing (carry)"] = (ckpts["state passing"], {})

    variants["control: states reset every L"] = (ckpts["none"], {"reset": True})

    results = {}
    for name, (ckpt, knobs) in variants.items():
        model = load(ckpt)
        reset = bool(knobs.get("reset"))
        set_knobs(model, **{k: v for k, v in knobs.items() if k != "reset"})
        losses = loss_by_position(model, evals, L, reset=reset)
        # the control's passkey would need a reset decoder; it is the no-mitigation model's
        acc = ({m: float("nan") for m in lengths} if reset else passkey_accuracy(model, tok, lengths, setup.passkey_keys))
        results[name] = {"knobs": knobs, "loss_by_position": losses, "passkey": acc,
                         "mean_past_L": sum(losses[1:]) / (len(losses) - 1)}
        print(f"[long-context] {name}: loss@L {losses[0]:.3f}, @{setup.factor}L {losses[-1]:.3f}", flush=True)

    picks = sorted({1, min(4, setup.factor), setup.factor})
    head = " | ".join(f"loss {m}L" for m in picks)
    print(f"\n| variant | {head} | mean loss L..{setup.factor}L | " + " | ".join(f"passkey {m}L" for m in setup.passkey_mults) + " |")
    print("|---" * (2 + len(picks) + len(setup.passkey_mults)) + "|")
    for name, r in results.items():
        cells = " | ".join(f"{r['loss_by_position'][m - 1]:.3f}" for m in picks)
        keys = " | ".join(f"{r['passkey'][m * L]:.2f}" for m in setup.passkey_mults)
        print(f"| {name} | {cells} | {r['mean_past_L']:.3f} | {keys} |")
    summary = {"setup": setup.__dict__, "state_norm_at_L": norm_at_L, "results": results,
               "seconds": time.perf_counter() - t0}
    (out / "long_context.json").write_text(json.dumps(summary, indent=1))
    plot(results, L, out / "long_context.png")
    print(f"\n[long-context] {time.perf_counter() - t0:.0f} s; wrote {out / 'long_context.json'} and "
          f"{out / 'long_context.png'}", flush=True)
    return summary


def plot(results: dict, seq_len: int, path: Path) -> None:
    """Loss by position per variant, and (right) each minus the reset-every-L control on the same
    tokens: the text makes the raw curves jagged, the difference is what the long context adds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    control = results.get("control: states reset every L", {}).get("loss_by_position")
    fig, axes = plt.subplots(1, 2 if control else 1, figsize=(14 if control else 8, 4.5), squeeze=False)
    for name, r in results.items():
        losses = r["loss_by_position"]
        pos = [(i + 1) * seq_len for i in range(len(losses))]
        style = dict(markersize=3, label=name, linewidth=2.5 if name in ("no mitigation", "state passing (carry)") else 1)
        axes[0][0].plot(pos, losses, "o-", **style)
        if control and not name.startswith("control"):
            axes[0][1].plot(pos, [a - b for a, b in zip(losses, control)], "o-", **style)
    for ax, label in zip(axes[0], ["loss (nats/byte), bucket of L tokens", "loss minus the reset-every-L control"]):
        ax.axvline(seq_len, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position (tokens; dashed: training length)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
