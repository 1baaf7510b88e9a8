"""Engine overhead: tokens/s of ``train()`` (DeepSpeed engine, NaN guard, lr schedule, logging)
against a plain PyTorch loop (AdamW, same model, same batches, same number of steps), one run.

    python bench/bench_engine.py                         # configs/tiny.yaml's model, CPU
    python bench/bench_engine.py --steps 30 model.layer_pattern=M-A-

Both paths see identical pre-generated batches; the time of a step is the gap between two batch
fetches, so set-up (DeepSpeed init, process group) is excluded and only the steady state counts.
Modes alternate (plain, engine, plain, engine) so drift on a shared machine hits both; medians are
reported (on a shared machine only ratios from one run hold, never a single time).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.train.config import load_job_config
from hybrid_lm.train.optim import build_optimizer


class TimedBatches:
    """A fixed list of batches that records when each one is taken (data-contract loader)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches, self.times, self.cursor = batches, [], 0

    def __iter__(self):
        while True:
            self.times.append(time.perf_counter())
            yield self.batches[self.cursor % len(self.batches)]
            self.cursor += 1

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]


def make_batches(cfg, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    B, T, V = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(V, (B, T + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "position_ids": torch.arange(T).expand(B, T).contiguous(), "doc_ids": torch.zeros(B, T, dtype=torch.long)})
    return out


def step_times(times: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]


def plain_loop(cfg, batches: list, steps: int) -> list[float]:
    torch.manual_seed(cfg.train.seed)
    model = HybridLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    source = TimedBatches(batches)
    it = iter(source)
    for _ in range(steps):
        b = next(it)
        loss = model(b["input_ids"], labels=b["labels"], doc_ids=b["doc_ids"], position_ids=b["position_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    next(it)
    return source.times


def engine_loop(cfg, batches: list, steps: int) -> list[float]:
    from hybrid_lm.train.loop import train

    source = TimedBatches(batches)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.train.run_dir, cfg.train.resume, cfg.train.steps = run_dir, "never", steps
        cfg.checkpoint.every, cfg.logging.tensorboard = 0, False
        cfg.eval.hooks = []  # evals run at the start and the end otherwise, and would draw timed batches
        cfg.checkpoint.dir = str(Path(run_dir) / "checkpoints")
        train(cfg, make_loader=lambda split, rank, world: source)
    return source.times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = ["logging.every=1000000", "parallel.gradient_accumulation=1", *args.overrides]
    cfg = load_job_config(args.config, overrides)
    batches = make_batches(cfg, 8)
    tokens = cfg.data.micro_batch_size * cfg.data.seq_len
    results: dict[str, list[float]] = {"plain": [], "engine": []}
    for mode in ("plain", "engine", "plain", "engine"):
        run = plain_loop if mode == "plain" else engine_loop
        # the engine saves a final checkpoint after the last step: its last fetch precedes that,
        # so the last interval is dropped for both modes alike
        results[mode] += step_times(run(load_job_config(args.config, overrides), batches, args.steps), args.warmup)[:-1]
    n_params = HybridLM(cfg.model).num_params()
    plain, engine = statistics.median(results["plain"]), statistics.median(results["engine"])
    print(f"model {cfg.model.layer_pattern} d_model={cfg.model.d_model}: {n_params / 1e6:.2f}M params, "
          f"{tokens} tokens/step, {args.threads} threads, {len(results['plain'])} timed steps per mode")
    print(f"plain PyTorch loop: {plain * 1e3:8.1f} ms/step  {tokens / plain:8.0f} tokens/s")
    print(f"hybrid-lm engine:   {engine * 1e3:8.1f} ms/step  {tokens / engine:8.0f} tokens/s")
    print(f"engine overhead:    {100 * (engine / plain - 1):+.1f}% (target <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
