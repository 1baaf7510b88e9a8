"""``hybrid-lm plan CONFIG --gpus N --gpu h100 [key.sub=value ...]``: will this job fit, how fast will it go.

    hybrid-lm plan configs/hybrid_7b.yaml --gpus 32 --gpu h100
    hybrid-lm plan configs/hybrid_1b.yaml --gpus 8 --gpu a100-40gb parallel.zero_stage=2 --mfu 0.35

Prints memory per GPU (weights, gradients, optimizer state, activations with and without activation
checkpointing) and the step time at ``--mfu``; how each figure is counted: ``train/plan.py``. Exit
codes: 0 fits, 1 does not fit (one line saying by how much and what would help), 2 bad config,
GPU count or GPU name.
"""
from __future__ import annotations

import argparse
import sys

from hybrid_lm.typed_config import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    from hybrid_lm.train.metrics import GPUS

    parser.add_argument("config", help="YAML/TOML/JSON job config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.micro_batch_size=2")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job (world size)")
    parser.add_argument("--gpu", default="h100", help=f"GPU model: {', '.join(GPUS)} (default h100)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time "
                                                               "(default 0.4)")


def _checkpointing(parallel: object) -> tuple[str, str]:
    """(letters the config checkpoints: "" none, "all" every block; a description), from
    ``parallel.activation_checkpointing`` (none/full/selective) and ``activation_checkpointing_layers``."""
    mode = getattr(parallel, "activation_checkpointing", "none")
    if mode == "full":
        return "all", "full"
    if mode == "selective":
        layers = getattr(parallel, "activation_checkpointing_layers", "")
        return layers, f"selective {layers!r}"
    return "", "none"


def main(args: argparse.Namespace) -> int:
    from hybrid_lm.train.config import load_job_config
    from hybrid_lm.train.metrics import GPUS
    from hybrid_lm.train.plan import GIB, Layout, format_plan, plan

    prog = "hybrid-lm plan"
    try:
        cfg = load_job_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return 2
    gpu = GPUS.get(args.gpu.lower())
    if gpu is None:
        print(f"{prog}: --gpu: unknown GPU {args.gpu!r} (known: {', '.join(GPUS)})", file=sys.stderr)
        return 2
    if args.gpus < 1 or not 0 < args.mfu <= 1:
        print(f"{prog}: --gpus must be >= 1 and --mfu in (0, 1], got {args.gpus} and {args.mfu}", file=sys.stderr)
        return 2
    par = cfg.parallel
    dtype = par.dtype if par.dtype != "auto" else "bf16"  # auto is bf16 on CUDA
    layout = Layout(gpus=args.gpus, tensor_parallel=par.tensor_parallel, pipeline_parallel=par.pipeline_parallel,
                    context_parallel=getattr(par, "context_parallel", 1),
                    sequence_parallel=getattr(par, "sequence_parallel", False), zero_stage=par.zero_stage,
                    cpu_offload=par.cpu_offload, dtype=dtype, micro_batch_size=cfg.data.micro_batch_size,
                    seq_len=cfg.data.seq_len, micro_batches=par.micro_batches)
    letters, described = _checkpointing(par)
    try:
        result = plan(cfg.model, layout, gpu, mfu=args.mfu, checkpoint_letters=letters)
    except ValueError as exc:
        print(f"{prog}: {args.config}: {exc}", file=sys.stderr)
        return 2
    print(format_plan(result, layout, gpu, args.mfu, described))
    if result.fits():
        return 0
    need, have = result.total() / GIB, result.capacity / GIB
    hint = ("it fits with parallel.activation_checkpointing=full" if result.fits(result.activations_checkpointed)
            else "raise tensor_parallel/pipeline_parallel or the ZeRO stage, or lower data.micro_batch_size or "
                 "data.seq_len")
    print(f"{prog}: {args.config}: does not fit: {need:.1f} GiB per GPU needed, {have:.1f} GiB usable on "
          f"{gpu.name}; {hint}", file=sys.stderr)
    return 1
