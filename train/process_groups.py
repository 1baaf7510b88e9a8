"""The tensor-, context-, pipeline- and data-parallel process groups, made by megatron-core's
``parallel_state``.

    info = distributed.init_distributed()               # the default group (torchrun or 1 rank)
    groups = process_groups.init_process_groups(tensor_parallel=2, context_parallel=1, pipeline_parallel=1)
    groups.tp_group, groups.tp_rank, groups.cp_group, groups.pp_rank, groups.dp_group, ...

Megatron's layout (order ``tp-cp-ep-dp-pp``) puts the tensor-parallel ranks innermost: with 4
ranks and TP=2, ranks {0, 1} and {2, 3} each hold one copy of the model split in two, and {0, 2},
{1, 3} are the data-parallel groups. So a TP group stays on one node, where its per-layer
all-reduces are cheapest; context-parallel ranks come next, pipeline stages outermost.

Gradients are averaged over ``dp_cp_group`` (data x context parallel): the ranks of a CP group hold
the same weights and each computed a part of the sequence's gradient (Megatron's
``get_data_parallel_group(with_context_parallel=True)``); ``dp_group`` alone is the replica count
the data loader splits by.

megatron-core keeps the groups in module globals; its tensor-parallel mappings and
``vocab_parallel_cross_entropy`` read them; DeepSpeed gets them through ``DeepSpeedMPU``.
Everything here works on gloo (CPU) as on NCCL: only the groups are made, none of Megatron's CUDA
RNG tracker or CUDA-allocating collectives are touched.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


def parallel_state() -> Any:
    """megatron.core.parallel_state, imported without its warnings about missing Transformer
    Engine/Apex (optional CUDA extensions we do not use)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core import parallel_state as ps
    return ps


@dataclass(frozen=True)
class ParallelGroups:
    tp_group: Any
    tp_rank: int
    tp_size: int
    dp_group: Any
    dp_rank: int
    dp_size: int
    cp_group: Any = None
    cp_rank: int = 0
    cp_size: int = 1
    pp_group: Any = None
    pp_rank: int = 0
    pp_size: int = 1
    dp_cp_group: Any = None
    """data x context parallel: the group gradients are averaged over (``dp_group`` when CP is 1)"""

    @property
    def grad_group(self) -> Any:
        return self.dp_cp_group if self.dp_cp_group is not None else self.dp_group


def _degrees(ps: Any) -> tuple[int, int, int]:
    return (ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size())


def init_process_groups(tensor_parallel: int = 1, *, context_parallel: int = 1, pipeline_parallel: int = 1,
                        timeout_s: float = 600.0) -> ParallelGroups:
    """Create the groups for TP x CP x PP x (the rest) data parallel; call after
    ``distributed.init_distributed()`` on every rank. Idempotent for the same degrees."""
    if not dist.is_initialized():
        raise RuntimeError("init_process_groups: torch.distributed is not initialised (call init_distributed first)")
    world = dist.get_world_size()
    model_ranks = tensor_parallel * context_parallel * pipeline_parallel
    if min(tensor_parallel, context_parallel, pipeline_parallel) < 1 or world % model_ranks:
        raise ValueError(f"parallel.tensor_parallel={tensor_parallel} x parallel.context_parallel={context_parallel} x "
                         f"parallel.pipeline_parallel={pipeline_parallel} = {model_ranks} does not divide the world "
                         f"size {world} (launch a multiple of {model_ranks} processes)")
    ps = parallel_state()
    wanted = (tensor_parallel, context_parallel, pipeline_parallel)
    if ps.model_parallel_is_initialized():
        if _degrees(ps) != wanted:
            raise RuntimeError(f"process groups exist for (tensor, context, pipeline) parallel = {_degrees(ps)}, "
                               f"asked for {wanted}; call destroy_process_groups() first")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
            context_parallel_size=context_parallel,
            distributed_timeout_minutes=max(1, round(timeout_s / 60)),
            # Megatron's extra gloo copies of the DP groups serve its own distributed optimizer only
            create_gloo_process_groups=False,
        )
    return current_groups()


def current_groups() -> ParallelGroups:
    """The groups made by ``init_process_groups`` (raises when there are none)."""
    ps = parallel_state()
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("tensor-parallel process groups are not initialised (call init_process_groups)")
    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(), tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(), dp_group=ps.get_data_parallel_group(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        cp_group=ps.get_context_parallel_group(), cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(), pp_group=ps.get_pipeline_model_parallel_group(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )


class DeepSpeedMPU:
    """What ``deepspeed.initialize(mpu=...)`` calls, over ``ParallelGroups``: megatron's
    parallel_state lacks ``get_model_parallel_rank``/``_world_size``, which DeepSpeed uses for its
    gradient norm (replicated parameters counted on model-parallel rank 0 only) and checkpoint names.
    The model-parallel group is DeepSpeed's: every rank holding another part of one model replica,
    tensor x pipeline parallel (megatron's ``get_model_parallel_group``; the tensor-parallel group
    when there is no pipeline). A pipeline engine takes DeepSpeed's own grid as its ``mpu``
    (``PipelineModule.mpu()``, the same ranks: ``pipeline_engine.pipeline_topology`` checks), so
    this serves the data-parallel engine and anything asking about the layout."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    def get_model_parallel_group(self) -> Any:
        if self.groups.pp_size == 1:
            return self.groups.tp_group
        return parallel_state().get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        if self.groups.pp_size == 1:
            return self.groups.tp_rank
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp_size * self.groups.pp_size

    def get_tensor_model_parallel_group(self) -> Any:
        return self.groups.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.groups.tp_group, 0)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.pp_size

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.groups.pp_group

    # DeepSpeed averages gradients (and shards ZeRO state) over its "data parallel" group: with
    # context parallelism that is data x context (``grad_group``), whose ranks all hold the same
    # weights. The data loader does not ask the mpu: it splits by ``groups.dp_rank`` (train/zero_engine.py).
    def get_data_parallel_group(self) -> Any:
        return self.groups.grad_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.groups.grad_group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.groups.grad_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.groups.grad_group)


def destroy_process_groups() -> None:
    """Forget Megatron's groups (before ``distributed.destroy_distributed``, or to re-initialise)."""
    ps = parallel_state()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
