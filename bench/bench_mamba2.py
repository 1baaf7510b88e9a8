"""CPU benchmark of the Mamba-2 layer: chunked SSD vs the sequential recurrence vs transformers.

Run: ``python bench/bench_mamba2.py`` (``--quick`` for a smoke run at T = 256, 512).

What it reports (medians of ``torch.utils.benchmark.Timer`` in one run, one intra-op thread;
absolute times on shared CPUs are noise, the ratios within one run are what holds):

1. forward + backward of one Mamba-2 layer (d_model 256, d_inner 512, 16 heads of 32, d_state 64,
   G = 1, chunk 64, batch 1) through three scans with identical weights: ours (chunked SSD),
   the same layer with the token-by-token recurrence (``ssd_sequential``) swapped in, and
   transformers' ``Mamba2Mixer`` torch path. Outputs are asserted equal (fp32) in the same run.
2. time and peak memory of ours at T vs 2T. Peak memory is the growth of the resident set's
   high-water mark (``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs; Linux
   only) over the resident size before one forward + backward, in a fresh subprocess per size
   after a short warm-up (probe in ``peak_memory.py``, shared with bench_memory.py). It counts every allocation torch makes on CPU (activations kept for
   backward and transient intermediates), not just Python objects (all tracemalloc sees).
   ``ru_maxrss`` would not do: Linux carries it over from the parent across fork/exec.

3. the scan alone, ``ssd_chunked`` vs ``ssd_sequential`` (same shapes), because the layer-level
   ratio is bounded by the projections, conv and norm that both layer variants share. The oracle
   steps through time with ``unbind`` so its backward is linear in T too (indexing ``x[:, t]``
   made it quadratic, which once inflated the ratio to 27x-190x).

Targets: chunked >= 20x the sequential recurrence at T = 4096, no slower than transformers,
T -> 2T growth <= 2.2x in time and memory. transformers 5.x has no ``Mamba2Mixer.torch_forward``;
without mamba_ssm its ``forward`` runs the hub kernels' reference PyTorch fallbacks, which is
what the HF column times (training mode, no cache).
"""
from __future__ import annotations

import argparse
import warnings
from contextlib import contextmanager

import torch
from torch.utils.benchmark import Timer

import hybrid_lm.models.mamba2.layer as mamba_layer
from hybrid_lm.kernels.ssd import ssd_chunked, ssd_sequential
from hybrid_lm.models.mamba2 import Mamba2
from peak_memory import hwm_growth, report, run_child

WIDTH = dict(d_model=256, d_state=64, headdim=32, ngroups=1, chunk_size=64, expand=2)


def make_layer(seed: int = 0) -> Mamba2:
    torch.manual_seed(seed)
    layer = Mamba2(WIDTH["d_model"], d_state=WIDTH["d_state"], headdim=WIDTH["headdim"], ngroups=WIDTH["ngroups"],
                   chunk_size=WIDTH["chunk_size"], expand=WIDTH["expand"], backend="torch")
    with torch.no_grad():
        layer.in_proj.weight.normal_(0, 0.02)
        layer.out_proj.weight.normal_(0, 0.02)
    return layer


def make_hf(layer: Mamba2) -> torch.nn.Module:
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(hidden_size=WIDTH["d_model"], num_heads=layer.nheads, head_dim=WIDTH["headdim"],
                       state_size=WIDTH["d_state"], n_groups=WIDTH["ngroups"], chunk_size=WIDTH["chunk_size"],
                       expand=WIDTH["expand"], num_hidden_layers=1, layer_norm_epsilon=1e-5)
    hf = Mamba2Mixer(cfg, layer_idx=0)
    hf.load_state_dict(layer.state_dict(), strict=True)
    return hf


@contextmanager
def sequential_scan():
    """Swap the layer's chunked scan for the token-by-token recurrence (same signature)."""
    original = mamba_layer.ssd_chunked

    def seq(x, dt, A, B, C, chunk_size, **kw):
        return ssd_sequential(x, dt, A, B, C, **kw)

    mamba_layer.ssd_chunked = seq
    try:
        yield
    finally:
        mamba_layer.ssd_chunked = original


def fwd_bwd(module, x: torch.Tensor, ours: bool) -> None:
    y = module(x)[0] if ours else module(x)
    y.sum().backward()


def median(fn, min_run_time: float) -> float:
    timer = Timer("fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_row(length: int, min_run_time: float) -> dict[str, float]:
    layer, x = make_layer(), torch.randn(1, length, WIDTH["d_model"], generator=torch.Generator().manual_seed(1))
    hf = make_hf(layer)
    with torch.no_grad():
        y = layer(x)[0]
        y_hf = hf(x)
        with sequential_scan():
            y_seq = layer(x)[0]
    torch.testing.assert_close(y, y_seq, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(y, y_hf, rtol=1e-3, atol=1e-5)
    row = {"ours": median(lambda: fwd_bwd(layer, x, True), min_run_time),
           "hf": median(lambda: fwd_bwd(hf, x, False), min_run_time)}
    with sequential_scan():
        row["seq"] = median(lambda: fwd_bwd(layer, x, True), min_run_time / 2)
    return row


def scan_row(length: int, min_run_time: float) -> dict[str, float]:
    """The scan alone (no projections, conv or norm, which both layer variants share)."""
    g = torch.Generator().manual_seed(2)
    heads, hdim = WIDTH["expand"] * WIDTH["d_model"] // WIDTH["headdim"], WIDTH["headdim"]
    x = torch.randn(1, length, heads, hdim, generator=g).requires_grad_()
    dt = (torch.rand(1, length, heads, generator=g) * 0.1).requires_grad_()
    A = (-1 - torch.rand(heads, generator=g)).requires_grad_()
    B, C = (torch.randn(1, length, WIDTH["ngroups"], WIDTH["d_state"], generator=g).requires_grad_() for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(ssd_chunked(x, dt, A, B, C, WIDTH["chunk_size"]), ssd_sequential(x, dt, A, B, C),
                                   rtol=1e-3, atol=1e-4)
    return {"ours": median(lambda: ssd_chunked(x, dt, A, B, C, WIDTH["chunk_size"]).sum().backward(), min_run_time),
            "seq": median(lambda: ssd_sequential(x, dt, A, B, C).sum().backward(), min_run_time / 2)}


def peak_memory_child(length: int) -> None:
    """Subprocess body: print the VmHWM growth (bytes) of one forward + backward at ``length``."""
    torch.set_num_threads(1)
    layer = make_layer()
    fwd_bwd(layer, torch.randn(1, 16, WIDTH["d_model"]), True)  # warm-up: allocator, lazy init
    x = torch.randn(1, length, WIDTH["d_model"])
    layer.zero_grad()
    report(hwm_growth(lambda: fwd_bwd(layer, x, True)))


def peak_memory(length: int) -> float:
    return run_child(__file__, "--memory-child", str(length))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        peak_memory_child(args.memory_child)
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    lengths = [256, 512] if args.quick else [1024, 2048, 4096]
    min_run_time = 0.2 if args.quick else 1.5

    print(f"Mamba-2 layer {WIDTH}, batch 1, fp32, 1 thread; forward+backward medians")
    print(f"{'T':>6} {'ours ms':>9} {'seq ms':>9} {'HF ms':>9} {'seq/ours':>9} {'HF/ours':>8}")
    rows = {}
    for length in lengths:
        r = rows[length] = time_row(length, min_run_time)
        print(f"{length:>6} {r['ours']*1e3:9.1f} {r['seq']*1e3:9.1f} {r['hf']*1e3:9.1f} "
              f"{r['seq']/r['ours']:9.1f} {r['hf']/r['ours']:8.2f}")

    print("\nscan only (ssd_chunked vs ssd_sequential), forward+backward medians")
    print(f"{'T':>6} {'ours ms':>9} {'seq ms':>9} {'seq/ours':>9}")
    for length in lengths:
        r = scan_row(length, min_run_time)
        print(f"{length:>6} {r['ours']*1e3:9.1f} {r['seq']*1e3:9.1f} {r['seq']/r['ours']:9.1f}")

    print("\nscaling of ours, T -> 2T (time from the table above; memory = VmHWM growth in a subprocess)")
    mem_lengths = lengths + [2 * lengths[-1]]
    mem = {t: peak_memory(t) for t in mem_lengths}
    print(f"{'T':>6} {'peak MiB':>9} {'mem 2T/T':>9} {'time 2T/T':>10}")
    for t in mem_lengths:
        mem_ratio = f"{mem[t] / mem[t // 2]:9.2f}" if mem.get(t // 2) else f"{'':>9}"
        time_ratio = f"{rows[t]['ours'] / rows[t // 2]['ours']:10.2f}" if t in rows and t // 2 in rows else f"{'':>10}"
        print(f"{t:>6} {mem[t] / 2**20:9.1f} {mem_ratio} {time_ratio}")


if __name__ == "__main__":
    main()
