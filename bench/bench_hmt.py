"""HMT (models/hmt/) against its own backbone on one long sequence.

Run: ``python bench/bench_hmt.py`` (``--quick`` for a smoke run; ``--device cuda`` on a GPU).

Reports, in one run (ratios within one run are what holds on a shared CPU):
1. forward tokens/s of HMT and of the plain backbone (full causal attention over the whole
   sequence) at T, 2T, 4T, and each one's time ratio to the T run: HMT's stays near 2x, 4x
   (linear: the backbone never sees more than one segment), the backbone's grows faster;
2. peak memory of one HMT forward at T vs 2T (resident high-water mark in a fresh subprocess per
   size, ``peak_memory.py``; on CUDA, ``torch.cuda.max_memory_allocated``).
The backbone is ``M-A-`` at d_model 128; HMT uses 128-position segments with 16 sensory tokens.
"""
from __future__ import annotations

import argparse
import time

import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hmt.model import HMTLM
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.typed_config import from_dict
from peak_memory import hwm_growth, report, run_child

BACKBONE = {"vocab_size": 258, "d_model": 128, "layer_pattern": "M-A-", "attention": {"n_heads": 4},
            "mamba2": {"d_state": 32, "headdim": 32, "chunk_size": 64}}
HMT = {"segment_length": 128, "sensory_tokens": 16, "cache_size": 32}


def build(hmt: bool, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    data = {**BACKBONE, "hmt": HMT} if hmt else BACKBONE
    config = from_dict(ModelConfig, data, "model")
    return (HMTLM(config) if hmt else HybridLM(config)).to(device).eval()


@torch.no_grad()
def seconds(model: torch.nn.Module, length: int, device: str, repeats: int) -> float:
    ids = torch.randint(0, 256, (1, length), device=device)
    model(ids)  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def memory_child(length: int) -> None:
    """Subprocess body: print the VmHWM growth of one HMT forward at ``length``."""
    torch.set_num_threads(1)
    model = build(True, "cpu")
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 256)))
        ids = torch.randint(0, 256, (1, length))
        report(hwm_growth(lambda: model(ids)))


def peak_memory(length: int, device: str) -> float:
    if not device.startswith("cuda"):
        return run_child(__file__, "--memory-child", str(length))
    model = build(True, device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(torch.randint(0, 256, (1, length), device=device))
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short sequences, one repeat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    base = 512 if args.quick else 2048
    repeats = 1 if args.quick else 3
    lengths = [base, 2 * base, 4 * base]
    print(f"bench_hmt: forward of one sequence, {args.device}; backbone {BACKBONE['layer_pattern']} "
          f"d_model {BACKBONE['d_model']}; HMT segment_length {HMT['segment_length']}")
    for name, hmt in (("hmt", True), ("backbone", False)):
        model = build(hmt, args.device)
        times = [seconds(model, n, args.device, repeats) for n in lengths]
        for n, t in zip(lengths, times):
            print(f"  {name:8s} T={n:6d}  {n / t:9.0f} tokens/s  time / time(T={base}) = {t / times[0]:.2f}")
    small, large = peak_memory(base, args.device), peak_memory(2 * base, args.device)
    print(f"  hmt peak memory: T={base} {small / 2**20:.1f} MiB, T={2 * base} {large / 2**20:.1f} MiB, "
          f"ratio {large / max(small, 1):.2f}")


if __name__ == "__main__":
    main()
