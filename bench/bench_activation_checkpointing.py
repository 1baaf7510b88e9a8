"""Peak memory and step time of one training step with and without activation checkpointing, on CPU.

Run: ``python bench/bench_activation_checkpointing.py`` (``--quick`` for a smoke run).

The model is configs/tiny.yaml's width (d_model 192, vocab 258) with one block of each of the
families the stack mixes, ``M-A-T-`` (Mamba-2, attention, Titans memory, SwiGLU MLPs), at B 4 x T 512.
For each setting of ``parallel.activation_checkpointing`` (none, full, and selective per family) a
fresh subprocess builds the model, applies ``train/activation_checkpointing.py``, runs one warm-up
step, then reports the growth of the resident high-water mark over one forward + backward
(``peak_memory.py``: every CPU allocation torch makes, freed intermediates included; glibc's mmap
threshold fixed so that freed blocks leave the resident set, see ``MALLOC``). Weights and their
gradients exist before the measured step (the warm-up allocated them), so the figure is what the
step adds: saved activations and the backward's transients. Ratios to ``none`` within one run are
what holds on a shared CPU; step times are medians of 3 (noise on a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from peak_memory import hwm_growth, report  # noqa: E402

#: glibc keeps freed blocks resident and raises its mmap threshold as large blocks are freed, so
#: after the warm-up step a step's activations would mostly reuse memory already counted in VmRSS
#: (measured: 0 MiB growth for some settings); a fixed threshold gives every block of 64 KiB or more
#: its own mapping, returned to the system when freed, so the high-water mark sees each step's peak
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
SETTINGS = [("none", ""), ("full", ""), ("selective", "M"), ("selective", "A"), ("selective", "T"),
            ("selective", "-"), ("selective", "MT")]


def _model_and_batch(quick: bool):
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.typed_config import from_dict

    d, t = (64, 128) if quick else (192, 512)
    cfg = from_dict(ModelConfig, dict(vocab_size=258, d_model=d, layer_pattern="M-A-T-", attention=dict(n_heads=d // 32),
                                      mamba2=dict(d_state=32, headdim=32, chunk_size=64),
                                      titans=dict(n_heads=d // 32, chunk_size=16)))
    torch.manual_seed(0)
    model = HybridLM(cfg)
    ids = torch.randint(0, 258, (4, t), generator=torch.Generator().manual_seed(1))
    return model, ids


def child(mode: str, layers: str, quick: bool) -> None:
    from hybrid_lm.train.activation_checkpointing import apply_activation_checkpointing

    torch.set_num_threads(1)
    model, ids = _model_and_batch(quick)
    apply_activation_checkpointing(model, mode, layers)

    def step() -> None:
        model.zero_grad(set_to_none=False)
        model(ids, labels=torch.roll(ids, -1, dims=1)).loss.backward()

    step()  # warm-up: gradients allocated, kernels' caches built
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": sorted(times)[1]}))
    report(hwm_growth(step))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mode")
    parser.add_argument("--layers", default="")
    args = parser.parse_args()
    if args.mode:
        child(args.mode, args.layers, args.quick)
        return
    rows = []
    for mode, layers in SETTINGS:
        # a fresh process per setting (peak_memory.py: the high-water mark is per process)
        out = subprocess.run([sys.executable, __file__, f"--mode={mode}", f"--layers={layers}",
                              *(["--quick"] if args.quick else [])], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **MALLOC}).stdout.strip().splitlines()
        step_s, peak = json.loads(out[-2])["step_s"], json.loads(out[-1])["peak_bytes"]
        rows.append((mode if mode != "selective" else f"selective {layers}", peak, step_s))
    base_peak, base_s = rows[0][1], rows[0][2]
    print(f"{'setting':<14} {'peak MiB':>9} {'/ none':>7} {'step s':>7} {'/ none':>7}")
    for name, peak, step_s in rows:
        print(f"{name:<14} {peak / 2**20:9.1f} {peak / base_peak:7.2f} {step_s:7.3f} {step_s / base_s:7.2f}")


if __name__ == "__main__":
    main()
