"""The training loop: ``train(cfg) -> TrainResult``.

    python -m hybrid_lm.cli train configs/debug.yaml                        # 1 process (CPU or 1 GPU)
    torchrun --nproc_per_node 2 -m hybrid_lm.cli train configs/debug.yaml   # 2 processes, 1 node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint $HEAD:29500 -m hybrid_lm.cli train configs/tiny.yaml   # 2 nodes

One optimizer step = the engine's forward and backward over its micro-batches (train/engine.py:
ZeRO data parallel or a DeepSpeed pipeline), then one all-reduce of (loss sum, non-finite count,
losses, tokens, stop flag) that lets every rank take the same decision: skip the update (NaN
anywhere), log, checkpoint, stop (SIGTERM anywhere), and only then the engine's update. Everything
else (parallel engines, checkpoint layout, faults, evaluation, metrics) lives in its own module.

Evals (``eval.hooks``, none when empty): before the first step of a fresh run with
``train.eval_at_start``, after every ``eval.every``-th step when ``every > 0``, and once after the
last step whatever ``every`` is (that one runs after the final checkpoint is saved, so a failing
eval cannot cost the run its weights). A run stopped early gets no final eval.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hybrid_lm.train import distributed as D
from hybrid_lm.train.activation_checkpointing import apply_activation_checkpointing
from hybrid_lm.train.build import (LoaderFactory, build_model, check_tokenizer_fits, default_loader_factory,
                                   model_summary, tokenizer_file)
from hybrid_lm.train.checkpoint import manager
from hybrid_lm.train.checkpoint.state import TrainerState
from hybrid_lm.train.config import JobConfig, job_config_to_dict
from hybrid_lm.train.engine import Engine
from hybrid_lm.train.evaluation import EvalConfig, EvalContext, resolve_hooks, run_evals
from hybrid_lm.train.faults import NanGuard, SpikeGuard, StopSignal
from hybrid_lm.train.metrics import MetricsLogger, TrainProgress, mfu, peak_flops
from hybrid_lm.train.optim import build_optimizer
from hybrid_lm.train.parallelize import parallelize
from hybrid_lm.train.run_lock import exclusive_run
from hybrid_lm.train.schedules import build_lr_schedule
from hybrid_lm.train.state_passing import attach_state_passing
from hybrid_lm.train.zero_engine import ZeroEngine
from hybrid_lm.typed_config import ConfigError


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    """mean loss of every step this invocation ran (NaN for skipped steps), keyed by the step count
    *before* the update: key n is the step that metrics, messages and checkpoints call n+1"""
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    stopped_by_signal: bool = False
    """stopped early (SIGTERM/SIGUSR1 or train.stop_at) after saving a checkpoint"""
    state: TrainerState = field(default_factory=TrainerState)


def _train_step(engine: Engine, batches, state: TrainerState, guard: NanGuard, spikes: SpikeGuard,
                stop: StopSignal, measure_grad_norm: bool) -> tuple[float, int, bool, Optional[float]]:
    """Run one optimizer step; returns (mean loss or NaN, global tokens, stop requested anywhere,
    the gradient norm when ``measure_grad_norm`` asks for it, else None)."""
    # messages and debug_nan_steps count steps as metrics rows and step-N checkpoints do: the update
    # that takes state.step from n to n+1 is step n+1
    number = state.step + 1
    stats = engine.forward_backward([next(batches) for _ in range(engine.micro_batches)],
                                    nan_loss=guard.poisons(number))
    g_loss, g_nonfinite, g_losses, g_tokens, g_stop = D.all_reduce_sum(
        [stats.loss_sum, stats.nonfinite, stats.losses, stats.tokens, float(stop.requested)], engine.device)
    mean_loss = g_loss / (g_losses - g_nonfinite) if g_nonfinite == 0 else float("nan")
    # every rank sees the same reduced loss and window, so every rank takes the same decision
    skip = guard.record(state, g_nonfinite == 0, number) or spikes.check(state, mean_loss, number)
    norm = engine.step(skip, grad_norm=measure_grad_norm)
    return mean_loss, int(g_tokens), g_stop > 0, norm


def build_engine(model: nn.Module, cfg: JobConfig, info: D.DistInfo) -> Engine:
    """The engine ``cfg.parallel`` asks for, around ``model`` (which holds its initial weights, or
    is on the meta device: then this rank's shards are initialised here and ``cfg.train.init_from``'s
    weights, when set, loaded into them)."""
    par = cfg.parallel
    groups, mpu, data_parallel = None, None, info.world_size
    if par.tensor_parallel > 1:
        from hybrid_lm.train.process_groups import DeepSpeedMPU, init_process_groups
        from hybrid_lm.train.build import check_init_keys, load_init_state
        from hybrid_lm.train.meta_init import is_meta, load_full_state, materialize
        from hybrid_lm.train.tensor_parallel import apply_tensor_parallel

        try:
            groups = init_process_groups(par.tensor_parallel, context_parallel=par.context_parallel,
                                         pipeline_parallel=par.pipeline_parallel, timeout_s=par.timeout_s)
        except ValueError as exc:  # a world size the degree does not divide: the launch, not the code
            raise ConfigError(str(exc)) from exc
        # every rank built the same seeded full model: cutting it gives the 1-process start exactly;
        # before the optimizer, which must hold the shards, not the full parameters (and before a
        # pipeline keeps its stage: every layer is cut alike, the other stages' then freed)
        apply_tensor_parallel(model, groups)
        if is_meta(model):  # built on the meta device (_train): allocate and initialise this rank's shards only
            materialize(model, torch.device("cpu"), seed=cfg.train.seed, groups=groups)
            init_from = cfg.train.init_from
            if init_from:  # the full tensors are read once; each rank keeps its pieces
                state, may_stay = load_init_state(cfg.model, init_from)
                check_init_keys(cfg.model, init_from, *load_full_state(model, state, groups=groups), may_stay)
                del state
        if par.sequence_parallel:  # the residual stream split along the sequence over the TP group (after
            # the weights exist: it hooks the norm parameters)
            from hybrid_lm.train.sequence_parallel import apply_sequence_parallel

            apply_sequence_parallel(model, groups)
        mpu, data_parallel = DeepSpeedMPU(groups), groups.dp_size
        if info.is_main and par.pipeline_parallel == 1 and par.context_parallel == 1:
            print(f"[tensor-parallel] {groups.tp_size} tensor parallel x {groups.dp_size} data parallel", flush=True)
    # after tensor parallelism (torchtitan's order), before an engine keeps its share of the blocks
    apply_activation_checkpointing(model, par.activation_checkpointing, par.activation_checkpointing_layers)
    if par.pipeline_parallel > 1:
        from hybrid_lm.train.pipeline_engine import PipelineEngine

        return PipelineEngine(model, par, cfg.optim, micro_batch_size=cfg.data.micro_batch_size,
                              seq_len=cfg.data.seq_len, grad_clip=cfg.train.grad_clip, device=info.device,
                              groups=groups)
    loss = None
    if par.context_parallel > 1:  # after tensor parallelism: the CP forwards see this rank's heads
        groups, mpu, data_parallel, loss = _context_parallel(model, cfg, info)
    elif groups is not None:  # the training loss from the vocabulary-sharded logits, never the gathered ones
        from hybrid_lm.train.tensor_parallel import VocabParallelLoss

        loss = VocabParallelLoss(model)
    optimizer = build_optimizer(model, cfg.optim)
    ds_engine = parallelize(model, optimizer, par, micro_batch_size=cfg.data.micro_batch_size,
                            world_size=data_parallel, grad_clip=cfg.train.grad_clip, device=info.device, mpu=mpu)
    return ZeroEngine(ds_engine, optimizer, micro_batches=par.gradient_accumulation, device=info.device, groups=groups,
                      loss=loss)


def _context_parallel(model: nn.Module, cfg: JobConfig, info: D.DistInfo) -> tuple:
    """Megatron's CP groups, the model's layers given their CP forwards, DeepSpeed's mpu averaging
    over data x context, and the loss of the whole sequence from this rank's slice
    (``train/context_parallel/apply.py``). Returns (groups, mpu, gradient-group size, loss)."""
    from hybrid_lm.train.context_parallel.apply import ContextParallelLoss, apply_context_parallel, context_parallel_of
    from hybrid_lm.train.process_groups import DeepSpeedMPU, init_process_groups
    from hybrid_lm.train.tensor_parallel import VocabParallelLoss

    par = cfg.parallel
    try:  # megatron's order tp-cp-ep-dp-pp (the groups exist already when tensor parallelism made them)
        groups = init_process_groups(par.tensor_parallel, context_parallel=par.context_parallel,
                                     timeout_s=par.timeout_s)
    except ValueError as exc:  # a world size the degree does not divide: the launch, not the code
        raise ConfigError(str(exc)) from exc
    cp = context_parallel_of(groups, cfg.data.seq_len, par.context_parallel_layout)
    runtime = apply_context_parallel(model, cp, attention=par.context_parallel_attention)
    tp = f"{groups.tp_size} tensor parallel x " if groups.tp_size > 1 else ""
    if info.is_main:
        print(f"[context-parallel] {tp}{groups.cp_size} context parallel ({par.context_parallel_layout}, attention "
              f"{par.context_parallel_attention}) x {groups.dp_size} data parallel", flush=True)
    # under TP the slice's loss comes from the vocabulary-sharded logits, never the gathered ones
    vocab = VocabParallelLoss(model) if groups.tp_size > 1 else None
    return groups, DeepSpeedMPU(groups), groups.dp_size * groups.cp_size, ContextParallelLoss(runtime, vocab)


def _periodic_eval_due(cfg: EvalConfig, step: int) -> bool:
    return cfg.every > 0 and step % cfg.every == 0


def train(cfg: JobConfig, *, make_loader: Optional[LoaderFactory] = None) -> TrainResult:
    """Train (or resume) ``cfg``; raises RunDirLocked before touching anything when another training
    holds the run dir (or a checkpoint dir outside it)."""
    resolve_hooks(cfg.eval)  # an unknown hook or a broken plugin fails now, not after the first eval interval
    info = D.init_distributed(cfg.parallel.timeout_s)
    run_dir, ckpt_root = Path(cfg.train.run_dir), cfg.checkpoint_dir
    owned = [run_dir] if ckpt_root.resolve().is_relative_to(run_dir.resolve()) else [run_dir, ckpt_root]
    with exclusive_run(owned, is_main=info.is_main):
        return _train(cfg, info, make_loader)


def _train(cfg: JobConfig, info: D.DistInfo, make_loader: Optional[LoaderFactory]) -> TrainResult:
    make_loader = make_loader or default_loader_factory(cfg.data)
    run_dir, ckpt_root, tok = Path(cfg.train.run_dir), cfg.checkpoint_dir, tokenizer_file(cfg.data)
    check_tokenizer_fits(cfg.model, tok, data_dir=Path(cfg.data.path) if cfg.data.path else None)
    resume_from = manager.find_resume(cfg.train.resume, ckpt_root)
    # with tensor parallelism the model is built on the meta device and each rank allocates only its shards
    model = build_model(cfg.model, seed=cfg.train.seed, init_from=cfg.train.init_from, resuming=resume_from is not None,
                        meta=cfg.parallel.tensor_parallel > 1)
    train_flops = 3.0 * model.flops_per_token(cfg.data.seq_len)  # the whole model's, whatever the engine keeps
    if info.is_main:
        print(model_summary(model, cfg.data.seq_len), flush=True)
    # a checkpoint about to be restored overwrites any init_from weights: the engine need not read them
    engine_cfg = cfg if resume_from is None else replace(cfg, train=replace(cfg.train, init_from=None))
    engine = build_engine(model, engine_cfg, info)
    attach_state_passing(engine, cfg, info.rank)
    del model  # the engine holds what this rank trains; a pipeline stage frees the other stages' layers
    loader = make_loader("train", engine.data_rank, engine.data_size)
    state, rng = TrainerState(), None
    if resume_from is not None:
        state, loader_state, rng = manager.restore(engine, resume_from, rank=info.rank, world_size=info.world_size,
                                                   tokenizer_file=tok, allow_tokenizer_change=cfg.checkpoint.allow_tokenizer_change)
        loader.load_state_dict(manager.loader_state(loader, loader_state))
        if info.is_main:
            print(f"[train] resumed from {resume_from} at step {state.step}", flush=True)
    lr_at = build_lr_schedule(cfg.schedule, cfg.train.steps, cfg.optim.lr)
    guard = NanGuard(cfg.train.max_consecutive_nan, cfg.train.debug_nan_steps)
    spikes = SpikeGuard(cfg.train.spike_sigma, cfg.train.spike_window, cfg.train.max_consecutive_nan)
    logger = MetricsLogger(run_dir, info.rank, cfg.logging.tensorboard)
    progress = TrainProgress(cfg.train.steps, state.step, info.rank)
    peak = peak_flops(info.device)
    result = TrainResult(step=state.step, state=state)

    def evaluate() -> None:
        if not cfg.eval.hooks:
            return
        ctx = EvalContext(make_val_loader=lambda: make_loader("val", engine.data_rank, engine.data_size), device=info.device,
                          step=state.step, reduce=lambda s, c: tuple(D.all_reduce_sum([s, c], info.device)))
        scores = run_evals(engine.module, cfg.eval, ctx)
        engine.module.train()
        result.evals[state.step] = scores
        logger.log(state.step, scores)

    def checkpoint() -> None:
        result.checkpoint = manager.save(
            engine, ckpt_root, state, rank=info.rank, world_size=info.world_size, loader_state=loader.state_dict(),
            job_config=job_config_to_dict(cfg), tokenizer_file=tok, keep=cfg.checkpoint.keep,
            zero_stage=cfg.parallel.zero_stage)

    if rng is not None:
        manager.apply_rng(rng)  # last: nothing built above may shift the restored streams
    elif cfg.train.eval_at_start:
        evaluate()
    engine.module.train()
    batches = iter(loader)
    # the logged train loss is the mean over the logging window: one step's loss on one batch is mostly noise
    window_start, window_tokens, window_losses = time.perf_counter(), 0, []
    with StopSignal() as stop:
        while state.step < cfg.train.steps:
            lr = lr_at(state.step)
            engine.set_lr(lr)
            log_due = (state.step + 1) % cfg.logging.every == 0 or state.step + 1 == cfg.train.steps
            loss, tokens, stop_requested, norm = _train_step(engine, batches, state, guard, spikes, stop,
                                                             measure_grad_norm=log_due)
            result.losses[state.step] = loss
            state.step += 1
            state.tokens += tokens
            window_tokens += tokens
            if math.isfinite(loss):
                window_losses.append(loss)
            done = state.step == cfg.train.steps
            stop_requested = stop_requested or state.step == cfg.train.stop_at
            if log_due:
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                window_loss = sum(window_losses) / len(window_losses) if window_losses else float("nan")
                metrics = {"train/loss": window_loss, "train/lr": lr, "train/tokens": state.tokens, "train/tokens_per_s": tps,
                           "train/nan_skipped": state.nan_skipped, "train/spike_skipped": state.spike_skipped,
                           "train/grad_norm": norm if norm is not None else float("nan")}
                util = mfu(train_flops, tps / info.world_size, peak) if peak else None
                if util is not None:
                    metrics["train/mfu"] = util
                logger.log(state.step, metrics)
                progress.update(state.step, loss=window_loss, tokens_per_s=tps, lr=lr, mfu=util)
                window_start, window_tokens, window_losses = time.perf_counter(), 0, []
            if _periodic_eval_due(cfg.eval, state.step) and not done:
                evaluate()
            every = cfg.checkpoint.every
            if stop_requested or done or (every > 0 and state.step % every == 0):
                checkpoint()
            if done:
                evaluate()
            if stop_requested:
                result.stopped_by_signal = True
                if info.is_main:
                    why = "stop signal received" if stop.requested else "train.stop_at reached"
                    print(f"[train] {why}; checkpoint saved at step {state.step}, exiting", flush=True)
                break
    if result.checkpoint is None and resume_from is not None and state.step == cfg.train.steps:
        result.checkpoint = resume_from  # resumed with nothing left to do
    logger.close()
    result.step = state.step
    return result
