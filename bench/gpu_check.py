"""GPU check: the CUDA paths against their CPU references, then tokens/s and MFU of the 1B hybrid
and its attention-only baseline through our engine. One call, one GPU, under 10 minutes.

    python bench/gpu_check.py                                # H100/H200: kernels, then 2 x 30 timed steps
    python bench/gpu_check.py --steps 50 --seq-len 8192      # longer rows
    python bench/gpu_check.py --cpu-dry-run                  # the same code on CPU at toy shapes (tests)

Part 1 runs each layer family on CUDA (flash-attn and mamba_ssm/causal-conv1d when installed, else
SDPA and our PyTorch kernels, which are also checked on CUDA in fp32) and compares the logits and
every parameter's gradient (the embedding's stands for the input's) with the same model on CPU in
fp32, packed documents included; plus the state-passing contract on CUDA (two calls with the
carried state equal one call). Tolerances are relative (norm of the difference over the norm of
the reference). fp32 on CUDA: 2e-4 (the same math, other summation orders; 5e-3 for mamba_ssm,
whose Triton kernels multiply fp32 in TF32), for every parameter's gradient on its own. bf16: 3e-2
for logits, 6e-2 for gradients (8 mantissa bits, ~4e-3 per rounding, accumulated over layers and
the backward), for each weight matrix and for all gradients together: the per-head vectors
(dt_bias, A_log, D) have gradients that are sums of many cancelling terms, 4-7% off in bf16 on CPU
already, so only the fp32 cases hold them one by one. The bf16 models keep the ``_keep_fp32``
parameters in fp32, as bf16 training does (``train/parallelize.py``).

Part 2 trains ``configs/hybrid_1b.yaml`` and ``configs/attention_1b.yaml`` on one GPU through
``build_engine`` (DeepSpeed ZeRO-0, bf16) on random tokens: warm-up steps, then timed steps between
two ``cuda.synchronize`` calls. MFU is 3 x ``flops_per_token`` x tokens/s over the card's dense bf16
peak (``train/metrics.py``); the peak allocated memory is printed beside ``hybrid-lm plan``'s
estimate for the same layout. A model that does not fit is retried with half its (mixer, MLP)
pairs, and the table says so. The last lines are a Markdown table for ``bench/RESULTS.md``.

Exit codes: 0 all passed, 1 a check failed or a loss was not finite (the line says which), 3 no
CUDA device.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
TOL_FP32, TOL_LOGITS_BF16, TOL_GRAD_BF16 = 2e-4, 3e-2, 6e-2
# mamba_ssm's Triton kernels multiply fp32 inputs in TF32 (10 mantissa bits, ~5e-4 per rounding)
TOL_TF32 = 5e-3


def installed(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        module = __import__(name)
        return getattr(module, "__version__", "installed")
    except Exception as exc:  # a broken install (ABI mismatch) must show, not crash the check
        return f"import fails: {type(exc).__name__}: {exc}".splitlines()[0][:120]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_model(model: torch.nn.Module, ids: torch.Tensor, doc_ids: torch.Tensor, weight: torch.Tensor):
    """Logits and gradients (embedding output stands in for the input gradient) of a fixed
    weighted sum of the logits, so every position's gradient is checked, not only a loss's mean."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, doc_ids=doc_ids).logits
    (logits.float() * weight.to(logits.device)).sum().backward()
    return logits.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()
                                           if p.grad is not None}


def check_family(name: str, cfg, device: torch.device, dtype: torch.dtype, shape: tuple[int, int],
                 fp32_tol: float = TOL_FP32) -> tuple[str, float, float, float, float]:
    """(name, logits error, worst gradient error, logits tolerance, gradient tolerance)."""
    from hybrid_lm.models.hybrid import HybridLM

    torch.manual_seed(0)
    reference = HybridLM(cfg)
    batch, seq = shape
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    doc_ids[:, seq // 3:] = 1  # two packed documents per row, the second starting mid-chunk
    doc_ids[-1, 2 * seq // 3 + 5:] = 2
    weight = torch.randn(batch, seq, cfg.vocab_size)
    want_logits, want_grads = run_model(reference, ids, doc_ids, weight)
    model = copy.deepcopy(reference).to(device=device, dtype=dtype)
    for (_, ref), (_, param) in zip(reference.named_parameters(), model.named_parameters()):
        if getattr(ref, "_keep_fp32", False):  # as bf16 training keeps them (Mamba-2 A_log/dt_bias/D, memory gates)
            param.data = param.data.float()
    got_logits, got_grads = run_model(model, ids.to(device), doc_ids.to(device), weight)
    if dtype == torch.float32:  # every parameter's gradient on its own
        grad_err = max(rel(got_grads[n], g) for n, g in want_grads.items())
        tol = (fp32_tol, fp32_tol)
    else:  # bf16: each matrix, and all gradients together (see the module docstring)
        names = list(want_grads)
        matrices = [rel(got_grads[n], want_grads[n]) for n in names if want_grads[n].dim() >= 2]
        together = rel(torch.cat([got_grads[n].flatten() for n in names]), torch.cat([want_grads[n].flatten() for n in names]))
        grad_err, tol = max(matrices + [together]), (TOL_LOGITS_BF16, TOL_GRAD_BF16)
    return name, rel(got_logits, want_logits), grad_err, *tol


def check_state_passing(name: str, cfg, device: torch.device, shape: tuple[int, int]) -> tuple[str, float, float, float, float]:
    """One call on the whole row against two calls with the state carried, both on ``device`` (fp32)."""
    from hybrid_lm.models.hybrid import HybridLM

    torch.manual_seed(0)
    model = HybridLM(cfg).to(device)
    batch, seq = shape
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    cut = seq // 2 + 3  # not a chunk boundary
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :cut], return_states=True)
        second = model(ids[:, cut:], states=first.states).logits
    return name, rel(torch.cat([first.logits, second], 1), whole), 0.0, TOL_FP32, TOL_FP32


def kernel_checks(device: torch.device, shape: tuple[int, int], d_model: int,
                  memory_shape: tuple[int, int]) -> list[tuple[str, float, float, float, float]]:
    """Every case on ``device`` against the CPU; ``memory_shape`` (smaller) for the cases with a Titans
    layer, whose CPU reference is the slowest part of the check."""
    from hybrid_lm.models.attention.flash import HAVE_FLASH
    from hybrid_lm.models.config import AttentionConfig, Mamba2Config, ModelConfig
    from hybrid_lm.models.mamba2 import backends
    from hybrid_lm.models.titans.config import TitansConfig

    def cfg(pattern: str, attention: Optional[dict] = None, mamba2: Optional[dict] = None) -> ModelConfig:
        return ModelConfig(vocab_size=512, d_model=d_model, layer_pattern=pattern,
                           attention=AttentionConfig(n_heads=4, n_kv_heads=2, **(attention or {})),
                           mamba2=Mamba2Config(headdim=32, d_state=64, chunk_size=64, **(mamba2 or {})),
                           titans=TitansConfig(n_heads=4))

    bf16 = torch.bfloat16
    window = {"window": shape[1] // 4}  # rows longer than 2W take the blocked sliding-window path
    cases: list[tuple[str, Callable[[], tuple]]] = [
        ("A- sdpa fp32", lambda: check_family("A- sdpa fp32", cfg("A-", {"backend": "sdpa"}), device, torch.float32, shape)),
        ("A- sdpa bf16", lambda: check_family("A- sdpa bf16", cfg("A-", {"backend": "sdpa"}), device, bf16, shape)),
        ("A- sdpa window bf16", lambda: check_family("A- sdpa window bf16", cfg("A-", {"backend": "sdpa", **window}),
                                                     device, bf16, shape)),
        ("M- torch fp32", lambda: check_family("M- torch fp32", cfg("M-", mamba2={"backend": "torch"}), device,
                                               torch.float32, shape)),
        ("M- torch bf16", lambda: check_family("M- torch bf16", cfg("M-", mamba2={"backend": "torch"}), device, bf16, shape)),
        ("T- fp32", lambda: check_family("T- fp32", cfg("T-"), device, torch.float32, memory_shape)),
        ("M-A-T- bf16", lambda: check_family("M-A-T- bf16", cfg("M-A-T-"), device, bf16, memory_shape)),
        ("M-A-T- state passing fp32", lambda: check_state_passing("M-A-T- state passing fp32", cfg("M-A-T-"), device,
                                                                  memory_shape)),
    ]
    if device.type == "cuda" and HAVE_FLASH:
        cases.append(("A- flash bf16", lambda: check_family("A- flash bf16", cfg("A-", {"backend": "flash"}), device,
                                                            bf16, shape)))
        cases.append(("A- flash window bf16", lambda: check_family(
            "A- flash window bf16", cfg("A-", {"backend": "flash", **window}), device, bf16, shape)))
    if device.type == "cuda" and backends.mamba_chunk_scan_combined is not None:
        for dt, tag in ((torch.float32, "fp32"), (bf16, "bf16")):
            cases.append((f"M- mamba_ssm {tag}", lambda dt=dt, tag=tag: check_family(
                f"M- mamba_ssm {tag}", cfg("M-", mamba2={"backend": "mamba_ssm"}), device, dt, shape, TOL_TF32)))
    rows = []
    for label, run in cases:
        t0 = time.perf_counter()
        try:
            rows.append(run())
        except Exception as exc:  # one broken path must not hide the others
            print(f"  {label:<28} ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            rows.append((label, float("inf"), float("inf"), 0.0, 0.0))
            continue
        name, e_out, e_grad, t_out, t_grad = rows[-1]
        ok = e_out <= t_out and e_grad <= t_grad
        print(f"  {name:<28} logits {e_out:9.2e} (tol {t_out:.0e})  grads {e_grad:9.2e} (tol {t_grad:.0e})  "
              f"{'ok' if ok else 'FAIL'}  {time.perf_counter() - t0:5.1f}s", flush=True)
    return rows


def throughput(path: Path, overrides: list[str], steps: int, warmup: int, device: torch.device, spec) -> dict:
    """Train ``path``'s model through our engine on random tokens; halves the pairs on OOM."""
    from hybrid_lm.train import distributed as D
    from hybrid_lm.train.build import build_model
    from hybrid_lm.train.config import load_job_config
    from hybrid_lm.train.loop import build_engine
    from hybrid_lm.train.metrics import mfu
    from hybrid_lm.train.plan import Layout, plan

    cfg = load_job_config(path, ["parallel.zero_stage=0", "parallel.gradient_accumulation=1", *overrides])
    full_pattern, note = cfg.model.layer_pattern, ""
    while True:
        info = D.init_distributed(cfg.parallel.timeout_s)
        try:
            model = build_model(cfg.model, seed=0, init_from=None, resuming=False)
            params = sum(p.numel() for p in model.parameters())
            fpt = 3.0 * model.flops_per_token(cfg.data.seq_len)
            engine = build_engine(model, cfg, info)
            del model
            batch, seq = cfg.data.micro_batch_size, cfg.data.seq_len
            g = torch.Generator().manual_seed(0)
            batches = []
            for _ in range(4):
                ids = torch.randint(cfg.model.vocab_size, (batch, seq + 1), generator=g)
                batches.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            losses, start = [], 0.0
            for i in range(warmup + steps):
                if i == warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                stats = engine.forward_backward([batches[i % len(batches)]])
                engine.step(skip=False)
                if i in (0, warmup + steps - 1):
                    losses.append(stats.loss_sum / max(stats.losses, 1))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            break
        except torch.cuda.OutOfMemoryError:
            pairs = len(cfg.model.block_pattern) // 2
            if pairs < 2:
                raise
            cfg.model.layer_pattern = cfg.model.block_pattern[: 2 * (pairs // 2)]
            note = f"{full_pattern.count('-')} pairs did not fit one GPU; measured {pairs // 2}"
            print(f"  {path.name}: out of memory; retrying with {pairs // 2} (mixer, MLP) pairs", flush=True)
        finally:
            engine = model = None  # noqa: F841 - drop the engine before the next attempt or model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # the 1-rank group stays for the next model: DeepSpeed caches groups made from it, and a
            # new group after destroying this one would leave those stale (as in-process train() does)
    tps = steps * batch * seq / elapsed
    fused = importlib.util.find_spec("mamba_ssm") is not None
    estimate = None
    if spec is not None:
        estimate = plan(cfg.model, Layout(gpus=1, micro_batch_size=batch, seq_len=seq), spec, fused=fused).total()
    return {"config": path.name, "pattern": cfg.model.layer_pattern, "params": params, "batch": batch, "seq": seq,
            "tokens_per_s": tps, "mfu": mfu(fpt, tps, spec.peak_bf16 if spec else None), "peak_mem": peak_mem,
            "plan_mem": estimate, "loss": losses, "note": note, "ms_per_step": 1e3 * elapsed / steps}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=["configs/hybrid_1b.yaml", "configs/attention_1b.yaml"])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every step on CPU at toy shapes (configs/debug.yaml), to test this script")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a "
              "machine with one H100/H200 (--cpu-dry-run runs the same code on CPU at toy shapes)", file=sys.stderr)
        return 3
    from hybrid_lm.train.metrics import gpu_spec

    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0)
    spec = gpu_spec(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    libs = {n: installed(n) for n in ("flash_attn", "mamba_ssm", "causal_conv1d", "triton", "deepspeed")}
    print(f"gpu_check {date}: {name} ({spec.name if spec else 'no peak known: MFU n/a'}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}; " + ", ".join(f"{k} {v}" for k, v in libs.items()), flush=True)

    print("1. CUDA paths against the CPU fp32 model (relative error of logits and of the worst gradient)")
    if device.type == "cuda":  # our fp32 checks compare true fp32 (the throughput runs in bf16 anyway)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    shape, memory_shape, d_model = ((1, 64), (1, 64), 32) if args.cpu_dry_run else ((2, 1024), (1, 512), 256)
    rows = kernel_checks(device, shape, d_model, memory_shape)
    failed = [r[0] for r in rows if not (r[1] <= r[3] and r[2] <= r[4])]

    print("2. training throughput through build_engine (ZeRO-0, one device, random tokens)")
    configs, over = [ROOT / c for c in args.configs], [f"data.seq_len={args.seq_len}",
                                                       f"data.micro_batch_size={args.micro_batch}"]
    steps, warmup = args.steps, args.warmup
    if args.cpu_dry_run:
        configs, over, steps, warmup = [ROOT / "configs/debug.yaml"], [], 2, 1
    results = []
    for path in configs:
        try:
            r = throughput(path, over, steps, warmup, device, spec)
        except Exception as exc:  # report it and measure the other model
            print(f"  {path.name}: ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            failed.append(f"{path.name} {type(exc).__name__}")
            continue
        results.append(r)
        finite = all(l == l and abs(l) != float("inf") for l in r["loss"])
        if not finite:
            failed.append(f"{r['config']} loss {r['loss']}")
        print(f"  {r['config']}: {r['tokens_per_s']:,.0f} tokens/s, {r['ms_per_step']:.1f} ms/step, loss "
              f"{r['loss'][0]:.3f} -> {r['loss'][-1]:.3f}{'' if finite else '  FAIL'}", flush=True)

    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.1f}"  # noqa: E731
    print(f"\n#### {date}, {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"flash_attn {libs['flash_attn']}, mamba_ssm {libs['mamba_ssm']}")
    print("Command: `python bench/gpu_check.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])) + "`\n")
    print("| check | logits rel. err | worst grad rel. err | tolerance | result |\n|---|---|---|---|---|")
    for n, e1, e2, t1, t2 in rows:
        print(f"| {n} | {e1:.2e} | {e2:.2e} | {t1:.0e} / {t2:.0e} | {'ok' if e1 <= t1 and e2 <= t2 else 'FAIL'} |")
    print("\n| config | pattern | params | micro-batch x seq | tokens/s | MFU | ms/step | peak mem GiB (plan) "
          "| loss first -> last | note |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['config']} | {r['pattern']} | {r['params'] / 1e9:.3f}B | {r['batch']} x {r['seq']} | "
              f"{r['tokens_per_s']:,.0f} | {util} | {r['ms_per_step']:.1f} | {gib(r['peak_mem'])} ({gib(r['plan_mem'])}) | "
              f"{r['loss'][0]:.3f} -> {r['loss'][-1]:.3f} | {r['note']} |")
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
