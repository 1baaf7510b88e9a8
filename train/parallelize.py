"""The one boundary where DeepSpeed wraps the model: ``parallelize(model, optimizer, cfg) -> engine``.

Models in ``models/`` are single-device code; data parallelism with ZeRO (stage 0-3), mixed
precision, gradient accumulation, clipping and CPU offload are applied here from outside, the
way torchtitan's ``parallelize_*`` functions apply FSDP/TP. The loop and the checkpoint manager
see the result through the engine interface (train/engine.py: ``ZeroEngine``, ``PipelineEngine``).
Nothing else in the tree imports DeepSpeed except ``distributed.py`` (process group),
``checkpoint/`` (its save/load and consolidation tools) and the pipeline (``pipeline.py``,
``pipeline_engine.py``: DeepSpeed's PipelineModule, which is wrapped here like a plain model).

The data-parallel degree is the world size divided by ``pipeline_parallel`` or by
``tensor_parallel`` (the model split by ``tensor_parallel.apply_tensor_parallel`` before this
wrapper, DeepSpeed given megatron's groups as ``mpu``: ``loop.build_engine``), and
``ParallelConfig`` says so in words rather than letting DeepSpeed fail on a batch-size assertion.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import torch
from torch import nn

from hybrid_lm.train.activation_checkpointing import check_layers
from hybrid_lm.typed_config import ConfigError


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 plain DDP, 1 shard optimizer state, 2 + gradients, 3 + parameters"""
    gradient_accumulation: int = 1
    """micro-batches per optimizer step on each rank"""
    cpu_offload: bool = False
    """offload optimizer state to CPU (ZeRO >= 1)"""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on CUDA, fp32 on CPU. bf16/fp16: DeepSpeed's mixed precision (16-bit weights and
    gradients, fp32 master weights in the optimizer), except the parameters a layer marks
    ``_keep_fp32`` (Mamba-2 ``A_log``/``dt_bias``/``D``, the memory gates and initial weights), which stay
    fp32 in the model (not under ZeRO-3); fp16 adds dynamic loss scaling and needs ZeRO >= 1"""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """recompute block activations in the backward pass instead of storing them
    (``train/activation_checkpointing.py``): every block (full) or the blocks whose letter is in
    ``activation_checkpointing_layers`` (selective); exact, costs about one more forward per step"""
    activation_checkpointing_layers: str = ""
    """layer letters to checkpoint with ``activation_checkpointing=selective``, e.g. "M" or "CX"; each must
    occur in model.layer_pattern (the MLP letter alone must be quoted, ``'"-"'`` on the command line:
    YAML reads a bare ``-`` as a list)"""
    timeout_s: float = 600.0
    """collective timeout: a rank stuck this long before a collective fails the job instead of hanging"""
    tensor_parallel: int = 1
    """ranks that split each layer by heads / hidden units (megatron-core layout, ``train/tensor_parallel.py``);
    the model's head counts, vocab and MLP width must be divisible by it (checked at config load)"""
    sequence_parallel: bool = False
    """with tensor_parallel > 1: split the activations between layers (residual stream, norms) along the
    sequence over the tensor-parallel group, Megatron-style (``train/sequence_parallel.py``);
    data.seq_len must divide by tensor_parallel"""
    pipeline_parallel: int = 1
    """pipeline stages (DeepSpeed's pipeline engine, ``train/pipeline_engine.py``): the layer pattern is
    cut at its ``|`` marks, else balanced by FLOPs per token; ZeRO 0-1 only"""
    pipeline_micro_batches: Optional[int] = None
    """micro-batches each pipeline runs per optimizer step with ``pipeline_parallel > 1`` (more fill
    the pipeline better: the idle bubble is (stages-1)/(micro-batches+stages-1) of a step); None means
    ``gradient_accumulation``"""
    context_parallel: int = 1
    """ranks that split each sequence (``train/context_parallel/``): every layer runs on its slice and is
    exact (attention gathers keys, recurrent layers pass their state); data parallel over the rest"""
    context_parallel_layout: Literal["contiguous", "zigzag"] = "contiguous"
    """contiguous: rank r holds slice r of N; zigzag: slices r and 2N-1-r of 2N (equal causal-attention
    work on every rank); data.seq_len must divide by the number of slices"""
    context_parallel_attention: Literal["allgather", "ulysses"] = "allgather"
    """allgather: local queries, all-gathered K/V (any head count); ulysses: all-to-all sequence <-> heads
    (needs model.attention.n_heads / tensor_parallel divisible by context_parallel)"""

    def refuse(self, keys: tuple[str, ...], subject: str, reason: str) -> None:
        """ConfigError naming the first of ``keys`` that is switched on (a degree above 1, or True)
        as not supported with ``subject``: the one message for every feature that runs only on
        some layouts (state passing, HMT, looped models)."""
        for key in keys:
            value = getattr(self, key)
            if value is True or (type(value) is int and value > 1):
                raise ConfigError(f"parallel.{key}: {value} is not supported with {subject} ({reason})")

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.gradient_accumulation < 1:
            raise ConfigError(f"parallel.gradient_accumulation: must be >= 1, got {self.gradient_accumulation}")
        if self.cpu_offload and self.zero_stage == 0:
            raise ConfigError("parallel.cpu_offload: needs zero_stage >= 1")
        if self.dtype == "fp16" and self.zero_stage == 0:
            # DeepSpeed 0.19's ZeRO-0 fp16 path divides gradients by the loss scale without having
            # scaled the loss (measured: gradients 2^16 too small, A_log all but frozen)
            raise ConfigError("parallel.dtype: fp16 needs parallel.zero_stage >= 1 (DeepSpeed's ZeRO-0 fp16 "
                              "optimizer unscales gradients it never scaled); use zero_stage 1 or bf16")
        if not 0 < self.timeout_s < float("inf"):
            raise ConfigError(f"parallel.timeout_s: must be > 0, got {self.timeout_s}")
        if self.tensor_parallel < 1:
            raise ConfigError(f"parallel.tensor_parallel: must be >= 1, got {self.tensor_parallel}")
        check_layers(self.activation_checkpointing, self.activation_checkpointing_layers)
        if self.activation_checkpointing != "none" and self.context_parallel > 1:
            # a context-parallel layer runs its collectives inside the CP step; a recompute outside it is untested
            raise ConfigError(f"parallel.activation_checkpointing: {self.activation_checkpointing} cannot be combined "
                              f"with parallel.context_parallel={self.context_parallel} yet")
        self._check_pipeline()
        self._check_tensor_parallel()
        self._check_context_parallel()

    def _check_context_parallel(self) -> None:
        cp = self.context_parallel
        if cp < 1:
            raise ConfigError(f"parallel.context_parallel: must be >= 1, got {cp}")
        if cp == 1:
            return
        # only what the tests train at CP > 1: ZeRO 0-2 over the data x context group, TP for attention
        # and MLP patterns (context_parallel/apply.py:check_context_parallel), no PP/SP/offload
        if self.pipeline_parallel > 1:
            raise ConfigError(f"parallel.context_parallel: {cp} cannot be combined with parallel.pipeline_parallel="
                              f"{self.pipeline_parallel} yet")
        if self.sequence_parallel:  # SP would split the CP slice again over the TP ranks: untested
            raise ConfigError(f"parallel.sequence_parallel: not supported with parallel.context_parallel={cp} yet")
        if self.zero_stage == 3:
            raise ConfigError(f"parallel.zero_stage: 3 cannot be combined with parallel.context_parallel={cp} "
                              "(use zero_stage 0, 1 or 2)")
        if self.cpu_offload:
            raise ConfigError(f"parallel.cpu_offload: not supported with parallel.context_parallel={cp}")

    def _check_tensor_parallel(self) -> None:
        tp = self.tensor_parallel
        if tp == 1:
            return
        # only what the tests train at TP > 1 (ZeRO 0-2 through DeepSpeed's mpu); ZeRO-3 would gather
        # the shards as if they were partitions of one replicated model, offload is untested
        if self.zero_stage == 3:
            raise ConfigError(f"parallel.zero_stage: 3 cannot be combined with parallel.tensor_parallel={tp} "
                              "(use zero_stage 0, 1 or 2)")
        if self.cpu_offload:
            raise ConfigError(f"parallel.cpu_offload: not supported with parallel.tensor_parallel={tp}")

    def _check_pipeline(self) -> None:
        pp, micro = self.pipeline_parallel, self.pipeline_micro_batches
        if pp < 1:
            raise ConfigError(f"parallel.pipeline_parallel: must be >= 1, got {pp}")
        if micro is not None:
            if micro < 1:
                raise ConfigError(f"parallel.pipeline_micro_batches: must be >= 1 or null, got {micro}")
            if pp == 1:
                raise ConfigError("parallel.pipeline_micro_batches: needs parallel.pipeline_parallel > 1 "
                                  "(without a pipeline, micro-batches per step are parallel.gradient_accumulation)")
            if self.gradient_accumulation > 1:
                raise ConfigError("parallel.pipeline_micro_batches: both it and parallel.gradient_accumulation "
                                  "count micro-batches per step; set only one")
        if pp == 1:
            return
        if self.zero_stage >= 2:
            raise ConfigError(f"parallel.zero_stage: {self.zero_stage} shards gradients, which DeepSpeed's pipeline "
                              f"engine cannot do (parallel.pipeline_parallel={pp}); use zero_stage 0 or 1")
        if self.cpu_offload:
            raise ConfigError(f"parallel.cpu_offload: not supported with parallel.pipeline_parallel={pp}")

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on each rank (each pipeline with ``pipeline_parallel > 1``)."""
        return self.pipeline_micro_batches or self.gradient_accumulation

    def resolved_dtype(self, device: torch.device) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if device.type == "cuda" else "fp32"


def deepspeed_config(cfg: ParallelConfig, *, micro_batch_size: int, world_size: int, grad_clip: float,
                     device: torch.device) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if cfg.zero_stage == 3:
        # No extra full-model gather at every save: consolidation (load_model_state) rebuilds
        # the exact fp32 weights from the saved partitions with DeepSpeed's zero_to_fp32.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.micro_batches,
        "train_batch_size": micro_batch_size * cfg.micro_batches * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": cfg.resolved_dtype(device) == "bf16"},
        # dynamic loss scaling (loss_scale 0): start at 2^16, halve on an overflowing step (which
        # DeepSpeed then skips), double after 1000 clean steps
        "fp16": {"enabled": cfg.resolved_dtype(device) == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # the trainer's optimiser is an AdamW subclass (SkippableAdamW); DeepSpeed accepts it
        # under ZeRO only with this flag
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
        # DeepSpeed insists on its own compiled CPUAdam under offload; ours (SkippableAdamW: the
        # NaN skip, decoupled decay groups) runs on the offloaded fp32 master weights as well
        "zero_force_ds_cpu_optimizer": False,
    }


def reports_grad_norm(engine) -> bool:
    """Whether ``engine.get_global_grad_norm()`` holds the norm after a step: ZeRO >= 1 and the
    bf16/fp16 optimisers compute it; plain ZeRO-0 in fp32 clips with a norm it discards (None)."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def grad_norm(model: nn.Module, tp_group: Any = None) -> float:
    """The 2-norm of every gradient of ``model`` (before clipping), for engines that do not report it.

    Call it after the accumulation boundary's backward and before ``engine.step()``: at ZeRO-0 the
    gradients are then reduced over the data-parallel ranks and identical on each, so this local
    norm is the global one. A tensor-parallel model (``tp_group``) adds the squares of its split
    gradients over the group, and its replicated ones (equal on every rank) once.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    split = [p.grad for p in params if getattr(p, "tensor_model_parallel", False)]
    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1 or not split:
        return float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
    replicated = [p.grad for p in params if not getattr(p, "tensor_model_parallel", False)]
    split_sq = torch.nn.utils.get_total_norm(split).double() ** 2
    torch.distributed.all_reduce(split_sq, group=tp_group)
    replicated_sq = float(torch.nn.utils.get_total_norm(replicated)) ** 2 if replicated else 0.0
    return (float(split_sq) + replicated_sq) ** 0.5


def parallelize(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: ParallelConfig, *,
                micro_batch_size: int, world_size: int, grad_clip: float, device: torch.device, mpu: Any = None):
    """Wrap ``model`` and ``optimizer`` in a DeepSpeed engine; returns the engine.

    The model must already hold its initial (or ``init_from``) weights: DeepSpeed broadcasts
    nothing for us under ZeRO-3, so identical init on every rank is the caller's job (seeded).
    A tensor-parallel model (``tensor_parallel.apply_tensor_parallel`` before the optimizer was
    built) comes with ``mpu=process_groups.DeepSpeedMPU(groups)``: DeepSpeed then averages
    gradients over the data-parallel group only, ``world_size`` is that group's size, and the
    clipping norm counts replicated parameters once.
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ds_config = deepspeed_config(cfg, micro_batch_size=micro_batch_size, world_size=world_size,
                                 grad_clip=grad_clip, device=device)
    dtype = cfg.resolved_dtype(device)
    if dtype == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ConfigError(f"parallel.dtype: fp16 is not supported on this device ({device}; DeepSpeed's "
                              f"{get_accelerator().device_name()} accelerator reports no fp16); use bf16 or fp32")
    model.to(device)
    # ZeRO-3 partitions parameters in buckets of one dtype (DeepSpeed asserts it when it
    # defragments them), so there the marked parameters are stored in 16 bits like the rest
    # (their optimizer master copy stays fp32)
    keep = dtype in ("bf16", "fp16") and cfg.zero_stage < 3
    if keep:
        split_fp32_groups(optimizer)
    with keep_fp32_parameters(model, enabled=keep):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    return engine


def keeps_fp32(param: torch.Tensor) -> bool:
    """Whether a layer marked ``param`` to stay fp32 under bf16/fp16 training (``_keep_fp32``)."""
    return bool(getattr(param, "_keep_fp32", False))


def split_fp32_groups(optimizer: torch.optim.Optimizer) -> None:
    """Move the ``_keep_fp32`` parameters of each optimizer group into a group of their own (same
    hyperparameters, name + "_fp32"), before any step. DeepSpeed flattens each group into one
    buffer of one dtype: a group mixing fp32 and bf16 parameters would turn them all fp32 (ZeRO
    1-2: the norms' outputs then no longer match the bf16 matmuls)."""
    groups = []
    for group in optimizer.param_groups:
        low = [p for p in group["params"] if not keeps_fp32(p)]
        full = [p for p in group["params"] if keeps_fp32(p)]
        if low:
            groups.append({**group, "params": low})
        if full:
            groups.append({**group, "params": full, "name": f"{group.get('name', 'group')}_fp32"})
    optimizer.param_groups[:] = groups


@contextmanager
def keep_fp32_parameters(model: nn.Module, *, enabled: bool) -> Iterator[None]:
    """Inside ``deepspeed.initialize``: the ``_keep_fp32`` parameters of ``model`` come out of
    DeepSpeed's bf16/fp16 cast in fp32.

    DeepSpeed casts every floating parameter of the module to the 16-bit dtype
    (``DeepSpeedEngine._cast_module_mixed_precision``; its ``keep_in_fp32_modules`` setting
    covers buffers only). Wrapping that one method puts the marked parameters' fp32 data back
    before the optimizer wrapper is built, which then keeps them in their own fp32 groups
    (``split_fp32_groups``): the layers read them in fp32 (they compute in fp32 anyway), and
    their fp32 master copy in the optimizer equals the model's. A DeepSpeed without that method
    fails here, loudly, rather than training with the parameters silently in 16 bits."""
    marked = [p for p in model.parameters() if keeps_fp32(p)]
    if not enabled or not marked:
        yield
        return
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = getattr(DeepSpeedEngine, "_cast_module_mixed_precision", None)
    if original is None:
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} has no DeepSpeedEngine._cast_module_mixed_precision: "
                           "cannot keep the _keep_fp32 parameters (Mamba-2 A_log/dt_bias/D, memory gates) in fp32 "
                           "under parallel.dtype bf16/fp16 (tested with DeepSpeed 0.19.8); use fp32 or that version")

    def cast(engine: Any, *args: Any, **kwargs: Any) -> Any:
        saved = [(p, p.data) for p in engine.module.parameters() if keeps_fp32(p)]
        result = original(engine, *args, **kwargs)
        for p, data in saved:
            p.data = data
        return result

    DeepSpeedEngine._cast_module_mixed_precision = cast  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeepSpeedEngine._cast_module_mixed_precision = original  # type: ignore[method-assign]
