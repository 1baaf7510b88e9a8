"""CPU benchmark of the neural memory (Titans/ATLAS) kernels and layers.

Run: ``python bench/bench_memory.py`` (add ``--quick`` for a smoke run).

Reports, as medians of ``torch.utils.benchmark.Timer`` in one run (ratios within one run, not
absolute times, are what holds on shared CPUs):
1. chunked kernel vs the per-token oracle at T = 512, 1024, 2048, outputs asserted equal; forward,
   then forward + backward;
2. chunked time and peak memory at T vs 2T (a linear layer stays near 2x). Peak memory is the
   growth of the resident high-water mark (VmHWM) over one forward call in a fresh subprocess
   per size after a warm-up (``peak_memory.py``); it sees torch's CPU allocations, which the
   tracemalloc figure used before did not;
3. training-step throughput of a MAC hybrid relative to an attention-only model of equal width
   (the baseline is the stack's own causal attention layer ``A``: SDPA with is_causal, no mask);
4. quality: validation loss of a MAC hybrid and of the attention-only stack of equal width after
   the same training on the embedded corpus (the whole step's tokens/s beside it, evals included).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from hybrid_lm.kernels.titans.chunked import chunked_memory_update
from hybrid_lm.kernels.titans.memory_mlp import memory_dims
from hybrid_lm.kernels.titans.reference import sequential_memory_update
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from peak_memory import hwm_growth, report, run_child


def kernel_inputs(length: int, heads: int = 4, d: int = 16, depth: int = 2, chunk: int = 16) -> tuple:
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(heads, *s, generator=g) * 0.2 for s in memory_dims(d, d, depth, 2)]
    s = [torch.zeros_like(x) for x in w]
    k = F.normalize(torch.randn(heads, length, 1, d, generator=g), dim=-1)
    v = torch.randn(heads, length, 1, d, generator=g)
    q = F.normalize(torch.randn(heads, length, d, generator=g), dim=-1)
    gates = [torch.rand(heads, length, generator=g) * sc for sc in (0.1, 0.5, 0.05)]
    return (w, s, w, k, v, torch.ones(heads, length, 1), q, *gates, torch.ones(heads, length, dtype=torch.bool), chunk)


def median(stmt: str, env: dict, min_run: float) -> float:
    # One intra-op thread (as bench_mamba2): on a shared 2-core machine two threads make single rows
    # swing by 10-50x whenever another job runs, and every ratio here compares equal thread counts.
    return Timer(stmt, globals=env, num_threads=1).blocked_autorange(min_run_time=min_run).median


def fwd_bwd(fn, inputs: tuple) -> None:  # type: ignore[no-untyped-def]
    """One forward + backward of a memory update with every learnt input requiring grad."""
    w, s, _, k, v, gamma, q, theta, eta, alpha, valid, chunk = inputs
    w = [t.detach().requires_grad_() for t in w]
    k, v, q, theta, eta, alpha = (t.detach().requires_grad_() for t in (k, v, q, theta, eta, alpha))
    y, w_end, _, _ = fn(w, s, w, k, v, gamma, q, theta, eta, alpha, valid, chunk, residual=True)
    (y.square().sum() + sum(t.sum() for t in w_end)).backward()


def peak_memory_child(length: int) -> None:
    """Subprocess body: print the VmHWM growth (bytes) of one chunked forward at ``length``."""
    torch.set_num_threads(1)
    with torch.no_grad():
        chunked_memory_update(*kernel_inputs(64), residual=True)  # warm-up: allocator, lazy init
        a = kernel_inputs(length)
        report(hwm_growth(lambda: chunked_memory_update(*a, residual=True)))


def peak_bytes(length: int) -> float:
    return run_child(__file__, "--memory-child", str(length))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        peak_memory_child(args.memory_child)
        return
    lengths = [128, 256] if args.quick else [512, 1024, 2048]
    min_run = 0.2 if args.quick else 1.0
    print("## chunked vs per-token oracle (4 heads, d_head 16, depth 2, chunk 16, fp32, forward)")
    print("| T | chunked ms | oracle ms | speed-up | max |dy| |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for length in lengths:
            a = kernel_inputs(length)
            y1 = chunked_memory_update(*a, residual=True)[0]
            y2 = sequential_memory_update(*a, residual=True)[0]
            err = (y1 - y2).abs().max().item()
            assert err < 1e-4, err
            env = {"f": chunked_memory_update, "g": sequential_memory_update, "a": a}
            tc = median("f(*a, residual=True)", env, min_run)
            ts = median("g(*a, residual=True)", env, min_run)
            print(f"| {length} | {tc * 1e3:.1f} | {ts * 1e3:.1f} | {ts / tc:.1f}x | {err:.1e} |")
    print("\n## the same, forward + backward (what training pays; grads of keys, values, queries, gates, W_0)")
    print("| T | chunked ms | oracle ms | speed-up |")
    print("|---|---|---|---|")
    for length in lengths:
        a = kernel_inputs(length)
        env = {"f": fwd_bwd, "c": chunked_memory_update, "g": sequential_memory_update, "a": a}
        tc = median("f(c, a)", env, min_run)
        ts = median("f(g, a)", env, min_run)
        print(f"| {length} | {tc * 1e3:.1f} | {ts * 1e3:.1f} | {ts / tc:.1f}x |")
    with torch.no_grad():
        print("\n## scaling of the chunked kernel: T vs 2T (memory: VmHWM growth in a subprocess)")
        print("| T | time ratio 2T/T | peak MiB at T | peak MiB at 2T | peak-memory ratio 2T/T |")
        print("|---|---|---|---|---|")
        for length in lengths[:-1]:
            a1, a2 = kernel_inputs(length), kernel_inputs(2 * length)
            env = {"f": chunked_memory_update, "a1": a1, "a2": a2}
            t1, t2 = median("f(*a1, residual=True)", env, min_run), median("f(*a2, residual=True)", env, min_run)
            m1, m2 = peak_bytes(length), peak_bytes(2 * length)
            print(f"| {length} | {t2 / t1:.2f} | {m1 / 2**20:.1f} | {m2 / 2**20:.1f} | {m2 / m1:.2f} |")
    print("\n## training step throughput: MAC hybrid vs attention-only (d_model 64, 4 blocks, batch 2)")
    length = 256 if args.quick else 1024
    rows = []
    for name, pattern in (("MAC hybrid C-C-", "C-C-"), ("attention only (full causal, layer A) A-A-", "A-A-")):
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=64, layer_pattern=pattern, vocab_size=256)
        cfg.titans.segment_len, cfg.titans.chunk_size, cfg.titans.memory_expansion = 64, 16, 2
        cfg.attention.n_heads = cfg.titans.n_heads
        model = HybridLM(cfg)
        ids = torch.randint(0, 256, (2, length))

        def train_step() -> None:
            model.zero_grad()
            model(ids, labels=ids).loss.backward()

        t = median("s()", {"s": train_step}, min_run)
        rows.append((name, 2 * length / t))
    base = rows[-1][1]
    for name, tps in rows:
        print(f"| {name} | {tps:.0f} tok/s | {tps / base:.2f}x |")
    quality(steps=30 if args.quick else 300)


def quality(steps: int) -> None:
    """Validation loss after the same training on the embedded corpus: speed without quality is
    not a result. configs/tiny.yaml through the real engine (ZeRO-0, the shard loader), 512-token
    rows, the model's own defaults (no hand-set gates), for a MAC hybrid and for the attention-only
    stack of the same width and depth."""
    import tempfile
    from pathlib import Path

    from hybrid_lm.data.writer import build_shards
    from hybrid_lm.train.config import load_job_config
    from hybrid_lm.train.loop import train

    root = Path(__file__).resolve().parents[1]
    print(f"\n## quality: validation loss after {steps} steps (configs/tiny.yaml, d_model 192, seq 512, batch 4)")
    print("| model | val loss at step 0 | val loss at the end | tok/s (whole step) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        build_shards("stdlib", shards, max_bytes=8_000_000, val_fraction=0.02, progress=False)
        for name, pattern in (("MAC hybrid M-C-M-A-", "M-C-M-A-"), ("attention only A-A-A-A-", "A-A-A-A-")):
            cfg = load_job_config(root / "configs/tiny.yaml", [
                f"model.layer_pattern={pattern}", f"data.path={shards}", "data.seq_len=512",
                "data.micro_batch_size=4", f"train.steps={steps}", f"train.run_dir={tmp}/{pattern}",
                "train.eval_at_start=true", "eval.every=0", "eval.max_batches=16", "eval.hooks=[val_loss]",
                f"checkpoint.every={steps}", "logging.tensorboard=false",
            ])
            start = time.perf_counter()
            result = train(cfg)
            seconds = time.perf_counter() - start
            first, last = result.evals[0]["val_loss"], result.evals[steps]["val_loss"]
            print(f"| {name} | {first:.3f} | {last:.3f} | {steps * 4 * 512 / seconds:.0f} |")


if __name__ == "__main__":
    main()
