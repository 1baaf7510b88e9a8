"""``PipelineEngine``: the engine interface (train/engine.py) over DeepSpeed's pipeline engine.

    hybrid-lm train configs/debug.yaml --nproc-per-node 2 parallel.pipeline_parallel=2
    hybrid-lm train CONFIG --nproc-per-node 4 parallel.pipeline_parallel=2 parallel.pipeline_micro_batches=8

Ranks form ``pipeline_parallel`` stages x data-parallel pipelines x ``tensor_parallel`` ranks per
stage, the stage outermost, the tensor-parallel rank innermost: rank = (stage * dp + data rank) *
tp + tp rank (DeepSpeed's ``PipeModelDataParallelTopology``, axes pipe-data-model, which is
megatron-core's order ``tp-cp-ep-dp-pp`` at CP = EP = 1; ``pipeline_topology`` checks the two agree
rank by rank). The stack is cut as train/pipeline.py says; with tensor parallelism each stage's
layers are split by the families' plans over megatron's TP group (``groups``). Ranks of one
pipeline read the same data shard (``data_rank``); the first stage feeds the token ids, the last
the labels.

One step runs DeepSpeed's 1F1B training schedule over the step's micro-batches (their gradients
are reduced over the data-parallel ranks and between the tied embedding/head at its end) with its
optimizer instruction left out: the loop decides NaN/spike skips from the all-reduced loss first,
then ``step(skip)`` runs that instruction (the update or, skipped, just the zeroing of gradients).
This reaches into DeepSpeed's schedule executor (``_exec_schedule``), the price of a decision
between the last backward and the update that ``train_batch`` does not leave room for.

Clipping: in fp32 at ZeRO-0 the norm is computed here, over every stage with the tied weight once,
as one process computes it: DeepSpeed's fp32 clip (``clip_grad_norm_`` with the pipeline grid as
``mpu``) keeps only the parameters of model-parallel rank 0, which in a pipeline is the first
stage. ZeRO-1 and bf16 clip in DeepSpeed's optimisers, which skip the tied copy themselves.

Evaluation (``module``) runs the whole model collectively: every rank of a pipeline calls it with
the same batch, activations go stage to stage, and the last stage's logits are broadcast to the
pipeline, so eval hooks work unchanged. Recurrent states and ``generate`` are not available.

Limits: every rank builds the whole model once (seeded, so stages start from bitwise the weights
of a one-process run) before keeping its stage: a model must fit one host's memory at start-up.
ZeRO 0-1 only (DeepSpeed), no CPU offload.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.schedule import OptimizerStep
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology
from torch import nn

from hybrid_lm.models.hybrid import HybridLM, ModelOutput
from hybrid_lm.train.engine import Batch, StepStats
from hybrid_lm.train.optim import OptimConfig, build_optimizer
from hybrid_lm.train.parallelize import ParallelConfig, parallelize
from hybrid_lm.train.pipeline import (Bounds, EmbedLayer, describe, lm_loss, pipeline_layers, spec_bounds,
                                      stage_bounds, state_dict_names)
from hybrid_lm.train.zero_engine import DeepSpeedFiles
from hybrid_lm.typed_config import ConfigError


def pipeline_topology(stages: int, data_parallel: int, groups: Any = None) -> Any:
    """DeepSpeed's grid of ``stages`` x ``data_parallel`` (x tensor parallel with ``groups``,
    ``process_groups.ParallelGroups``) ranks, stage outermost. With ``groups`` every rank checks that
    DeepSpeed puts it at megatron's (stage, data rank, TP rank): the TP layers all-reduce over
    megatron's group while DeepSpeed sends activations by its own coordinates, and a mismatch would
    pair shards of different layers without any error."""
    if groups is None or groups.tp_size == 1:
        return PipeDataParallelTopology(num_pp=stages, num_dp=data_parallel)
    topo = PipeModelDataParallelTopology(num_pp=stages, num_mp=groups.tp_size, num_dp=data_parallel)
    mine = topo.get_coord(dist.get_rank())
    megatron = (groups.pp_rank, groups.dp_rank, groups.tp_rank)
    if (mine.pipe, mine.data, mine.model) != megatron:
        raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed's pipeline topology puts it at (stage, data, tensor) = "
                           f"{(mine.pipe, mine.data, mine.model)}, megatron-core's groups at {megatron}")
    return topo


class PipelineEngine(DeepSpeedFiles):
    def __init__(self, model: HybridLM, cfg: ParallelConfig, optim: OptimConfig, *, micro_batch_size: int,
                 seq_len: int, grad_clip: float, device: torch.device, groups: Any = None) -> None:
        """``groups`` (megatron's, ``process_groups.ParallelGroups``) with ``tensor_parallel > 1``:
        ``model`` is already split by ``tensor_parallel.apply_tensor_parallel`` over them."""
        world, stages = dist.get_world_size(), cfg.pipeline_parallel
        tp = groups.tp_size if groups is not None else 1
        if world % (stages * tp):
            raise ConfigError(f"parallel.pipeline_parallel: {stages} stages x parallel.tensor_parallel={tp} do not "
                              f"divide the world size {world} (launch a multiple of {stages * tp} processes)")
        data_parallel = world // (stages * tp)
        self.device, self.micro_batches = device, cfg.micro_batches
        self.bounds: Bounds = stage_bounds(model, stages, seq_len)
        self._n_blocks = model.config.n_blocks
        split = describe(model.config.block_pattern, self.bounds)
        self.checkpoint_layout = {"pipeline_parallel": stages, "pipeline_stages": split}
        if tp > 1:
            self.checkpoint_layout["tensor_parallel"] = tp
        self._tp_group = groups.tp_group if tp > 1 else None
        self._reports_tp = tp == 1 or groups.tp_rank == 0
        self._loss = _Loss(vocab_parallel=tp > 1)
        # no_grad: DeepSpeed broadcasts the tied weight in place into the parameter, which under
        # autograd leaves an unsupported c10d node on its graph (torch warns at every backward).
        # redirect_stdout: DeepSpeed prints its seed settings on rank 0; the split is reported below.
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            pipe = _HybridPipe(pipeline_layers(model), spec_bounds(self.bounds, model.config.n_blocks),
                               topology=pipeline_topology(stages, data_parallel, groups), loss_fn=self._loss)
        self.optimizer = build_optimizer(pipe, optim)
        # fp32 ZeRO-0 clips here (module docstring); otherwise DeepSpeed's optimiser does
        self._own_clip = cfg.zero_stage == 0 and cfg.resolved_dtype(device) == "fp32"
        self._grad_clip = grad_clip
        self._ds = parallelize(pipe, self.optimizer, cfg, micro_batch_size=micro_batch_size,
                               world_size=data_parallel, grad_clip=0.0 if self._own_clip else grad_clip,
                               device=device)
        grid = pipe.mpu()
        self._pipe, self._grid = pipe, grid
        self._heads = _vocab_parallel_heads(pipe) if tp > 1 else []
        self.data_rank, self.data_size = grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()
        self.module = PipelinedLM(pipe, model.config, grid)
        if dist.get_rank() == 0:
            print(f"[pipeline] {stages} stages x {data_parallel} data parallel"
                  f"{f' x {tp} tensor parallel' if tp > 1 else ''}: {split} "
                  f"({self.micro_batches} micro-batches per step)", flush=True)

    def hybrid_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This stage's parameters under ``HybridLM``'s names (the tied embedding/head as
        ``embed.weight`` on both stages that hold it), for resharding a checkpoint."""
        out = []
        for name, p in self._pipe.named_parameters():
            if name.startswith("tied_modules."):
                out.append((name.split(".", 2)[2], p))  # tied_modules.<key>.<EmbedLayer's names>
            else:
                layer, key = name.split(".", 1)
                out.append((state_dict_names(int(layer), self._n_blocks, key), p))
        return out

    def load(self, directory: Path) -> None:
        with torch.no_grad():  # DeepSpeed re-broadcasts the tied weight in place after loading (see __init__)
            super().load(directory)

    def forward_backward(self, batches: Sequence[Batch], *, nan_loss: bool = False) -> StepStats:
        if len(batches) != self.micro_batches:
            raise ValueError(f"forward_backward: {len(batches)} micro-batches, the engine was built for {self.micro_batches}")
        ds = self._ds
        self._loss.nan = nan_loss
        ds.set_dataiterator(iter([((b["input_ids"], *_ids_and_positions(b)), b["labels"]) for b in batches]))
        # what PipelineEngine.train_batch sets up before running its schedule
        ds.module.train()
        ds.total_loss, ds.total_additional_losses, ds._compute_loss = None, None, True
        with _local_logits(self._heads):  # the last stage's loss reads its vocabulary shard (_Loss)
            ds._exec_schedule(_WithoutStep(ds._train_schedule()))
        stats = StepStats()
        if ds.is_last_stage() and self._reports_tp:  # the TP ranks of a stage hold the same loss
            for loss, batch in zip(ds.fwd_outputs, batches):
                stats.add(float(loss), batch["input_ids"].numel())
        return stats

    def step(self, skip: bool, *, grad_norm: bool = False) -> Optional[float]:
        norm = None
        if self._own_clip and (self._grad_clip > 0 or grad_norm):
            norm = self._clip_grad_norm()
        with self.optimizer.skipping(skip):
            self._ds._exec_optimizer_step()
        if grad_norm and not self._own_clip:
            reported = self._ds.get_global_grad_norm()
            norm = float(reported) if reported is not None else None
        return norm if grad_norm else None

    def _clip_grad_norm(self) -> float:
        """The global gradient norm (the tied weight once, a replicated parameter of a TP group
        once, its split ones summed over the group), and clipping to ``grad_clip`` with the formula
        of DeepSpeed's fp32 clip."""
        params = [p for p in self._pipe.parameters() if p.grad is not None]
        owned = [p.grad.detach().float().norm(2) for p in params if not getattr(p, "ds_pipe_replicated", False)
                 and (self._reports_tp or getattr(p, "tensor_model_parallel", False))]
        squares = torch.stack(owned).pow(2).sum() if owned else torch.zeros((), device=self.device)
        if self._tp_group is not None:
            dist.all_reduce(squares, group=self._tp_group)
        dist.all_reduce(squares, group=self._grid.get_pipe_parallel_group())
        total = squares.sqrt()
        if self._grad_clip > 0:
            coef = torch.clamp(self._grad_clip / (total + 1e-6), max=1.0)
            for p in params:
                p.grad.detach().mul_(coef)
        return float(total)


def _ids_and_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, position_ids) of ``batch``; without them, one document per row from position 0
    (tensors must travel between stages, so None is spelled out)."""
    ids = batch["input_ids"]
    doc_ids = batch.get("doc_ids")
    position_ids = batch.get("position_ids")
    if doc_ids is None:
        doc_ids = torch.zeros_like(ids)
    if position_ids is None:
        position_ids = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
    return doc_ids, position_ids


class _Loss:
    """The last stage's loss function; ``nan`` poisons it for ``train.debug_nan_steps``. With
    tensor parallelism the logits are this rank's vocabulary shard (``_local_logits``) and the loss
    is megatron-core's vocab-parallel cross-entropy, as ``VocabParallelLoss`` does for the ZeRO
    engine: no rank of the last stage holds a training step's full (B, T, V) logits."""

    nan = False

    def __init__(self, *, vocab_parallel: bool = False) -> None:
        self.vocab_parallel = vocab_parallel

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.vocab_parallel:
            from hybrid_lm.train import tensor_parallel

            loss = tensor_parallel.vocab_parallel_loss(logits, labels)
        else:
            loss = lm_loss(logits, labels)
        return loss * float("nan") if self.nan else loss


def _vocab_parallel_heads(pipe: nn.Module) -> list[nn.Module]:
    """The modules whose ``gather_output`` switches this stage's LM head to local logits: the tied
    head's embedding (on the first stage it only embeds, which the flag does not touch) or an
    untied ``VocabParallelHead``."""
    from hybrid_lm.train.tensor_parallel import VocabParallelHead

    return [m for m in pipe.modules() if isinstance(m, (EmbedLayer, VocabParallelHead))]


@contextlib.contextmanager
def _local_logits(heads: Sequence[nn.Module]) -> Iterator[None]:
    """Inside: ``heads`` return this rank's (B, T, V/N) logits; after: gathered again (evaluation,
    ``PipelinedLM``)."""
    for head in heads:
        head.gather_output = False
    try:
        yield
    finally:
        for head in heads:
            del head.gather_output  # back to the class default: gathered


class _WithoutStep:
    """A DeepSpeed pipeline schedule minus its OptimizerStep instructions."""

    def __init__(self, schedule: Any) -> None:
        self._schedule = schedule

    def num_pipe_buffers(self) -> int:
        return self._schedule.num_pipe_buffers()

    def __iter__(self) -> Iterator[list[Any]]:
        for cmds in self._schedule:
            yield [c for c in cmds if not isinstance(c, OptimizerStep)]


class _HybridPipe(PipelineModule):
    """DeepSpeed's PipelineModule cut at our stage bounds instead of one of its partition methods."""

    def __init__(self, layers: list[Any], parts: list[int], **kwargs: Any) -> None:
        object.__setattr__(self, "_given_parts", parts)  # read by _partition_layers during __init__
        super().__init__(layers, **kwargs)
        # DeepSpeed keeps every layer spec for later; ours are built modules, and those of other
        # stages would keep the whole model alive on every rank
        self._layer_specs = [spec if self._local_start <= i < self._local_stop else None
                             for i, spec in enumerate(self._layer_specs)]

    def _partition_layers(self, method: str = "") -> None:
        self.parts = list(self._given_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


class PipelinedLM(nn.Module):
    """The pipeline as one model for evaluation (``HybridLM``'s call, without states); collective
    over the pipeline: every stage calls it with the same arguments and gets the same logits."""

    def __init__(self, pipe: nn.Module, config: Any, grid: Any) -> None:
        super().__init__()
        self.pipe, self.config = pipe, config
        self._stage, self._stages = grid.get_stage_id(), grid.get_pipe_parallel_world_size()
        self._prev = grid.stage_to_global(self._stage - 1) if self._stage > 0 else None
        self._next = grid.stage_to_global(self._stage + 1) if self._stage < self._stages - 1 else None
        self._last = grid.stage_to_global(self._stages - 1)
        self._group = grid.get_pipe_parallel_group()

    def forward(self, input_ids: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                states: Any = None, return_states: bool = False) -> ModelOutput:
        if states is not None or return_states:
            raise NotImplementedError("a pipeline-parallel model does not carry recurrent states between calls")
        batch = {"input_ids": input_ids, "doc_ids": doc_ids, "position_ids": position_ids}
        doc_ids, position_ids = _ids_and_positions(batch)
        dtype = next(self.pipe.parameters()).dtype
        B, T = input_ids.shape
        if self._prev is None:
            x = input_ids
        else:
            x = torch.empty(B, T, self.config.d_model, dtype=dtype, device=input_ids.device)
            dist.recv(x, src=self._prev)
        out = self.pipe((x, doc_ids, position_ids))
        if self._next is not None:
            dist.send(out[0].contiguous(), dst=self._next)
            out = torch.empty(B, T, self.config.vocab_size, dtype=dtype, device=input_ids.device)
        dist.broadcast(out, src=self._last, group=self._group)
        return ModelOutput(logits=out, loss=None if labels is None else lm_loss(out, labels))
