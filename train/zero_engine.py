"""``ZeroEngine``: the engine interface (train/engine.py) over DeepSpeed's data-parallel engine, ZeRO 0-3.

Built by ``train/parallelize.py``; the loop and the checkpoint manager see only the interface.
``DeepSpeedFiles`` holds what every DeepSpeed-backed engine shares (the pipeline engine too):
its checkpoint files, written with the file named on a full disk and read weights-only.

Gradient accumulation: every micro-batch but the last runs with DeepSpeed's accumulation
boundary explicitly off, the last with it on (gradients are reduced over the data-parallel ranks
there), then one ``step()``. That is the sequence of operations DeepSpeed performs when it counts
micro-steps itself, so results are bitwise those of a loop calling ``engine.step()`` after every
micro-batch, without anyone outside this file depending on that counter.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from hybrid_lm.train import distributed as D
from hybrid_lm.train.checkpoint import layout, safe_load
from hybrid_lm.train.checkpoint.manager import DS_TAG
from hybrid_lm.train.engine import Batch, StepStats, to_device
from hybrid_lm.train.optim import SkippableAdamW, set_lr
from hybrid_lm.train.parallelize import grad_norm as local_grad_norm
from hybrid_lm.train.parallelize import reports_grad_norm


class DeepSpeedFiles:
    """Save/load of a DeepSpeed engine ``self._ds`` into a checkpoint directory, and the learning rate."""

    _ds: Any
    optimizer: SkippableAdamW
    device: torch.device
    checkpoint_layout: dict[str, Any] = {}

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def save(self, directory: Path) -> None:
        with _writes_named(self._ds):
            self._ds.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        ds_dir = Path(directory) / DS_TAG
        # rank 0 scans every rank's files so all ranks refuse together instead of one rank failing
        # inside DeepSpeed while the others wait in its next collective
        refused = safe_load.scan(ds_dir) if D.is_main() else None
        refused = D.broadcast_object(refused)
        if refused:
            raise layout.CheckpointError("; ".join(refused))  # type: ignore[arg-type]
        with safe_load.weights_only_loads(ds_dir):
            load_path, _ = self._ds.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if load_path is None:
            raise layout.CheckpointError(f"{ds_dir}: DeepSpeed could not load the model/optimizer state")


class ZeroEngine(DeepSpeedFiles):
    """Data parallel over every rank; ``module`` is DeepSpeed's (under ZeRO-3, partitioned) model.

    With ``groups`` (``process_groups.ParallelGroups``, the model split by
    ``tensor_parallel.apply_tensor_parallel`` and DeepSpeed given them as ``mpu``) the data
    parallelism is over ``groups.dp_group``: the ranks of one TP group read the same data shard,
    compute the same loss, and only TP rank 0 reports it, so the loop's all-reduce counts each
    data-parallel replica's losses and tokens once. Context parallelism (``groups.cp_size > 1``)
    likewise: the ranks of a CP group read the same batch, each runs its slice, and DeepSpeed
    averages gradients over data x context (``DeepSpeedMPU``).

    ``loss`` (``tensor_parallel.VocabParallelLoss`` under TP, ``context_parallel.apply.ContextParallelLoss``
    under CP), when given, computes each micro-batch's training loss from the module, the input ids
    and the batch's keyword arguments, in place of the model's own ``ModelOutput.loss``."""

    def __init__(self, ds_engine: Any, optimizer: SkippableAdamW, *, micro_batches: int, device: torch.device,
                 groups: Any = None, loss: Optional[Callable[..., torch.Tensor]] = None) -> None:
        self._ds, self.optimizer, self.device = ds_engine, optimizer, device
        self._loss = loss
        self.module = ds_engine.module
        self.micro_batches = micro_batches
        tp = groups.tp_size if groups is not None else 1
        cp = groups.cp_size if groups is not None else 1
        self._tp_group = groups.tp_group if tp > 1 else None
        # the ranks of a CP group compute one loss of the whole sequence (context_parallel/apply.py)
        # on the tokens of one batch: CP rank 0 reports it, with the whole batch's token count
        self._reports = groups is None or (groups.tp_rank == 0 and groups.cp_rank == 0)
        if tp > 1 or cp > 1:
            self.data_rank, self.data_size = groups.dp_rank, groups.dp_size
            self.checkpoint_layout = {k: v for k, v in (("tensor_parallel", tp), ("context_parallel", cp)) if v > 1}
        else:
            self.data_rank, self.data_size = D.dist.get_rank(), D.dist.get_world_size()
            self.checkpoint_layout = {}
        # ZeRO-0 in fp32 clips with a norm it then discards; measure it ourselves when asked
        self._own_norm = not reports_grad_norm(ds_engine)

    #: ``train.state_passing``'s carrier (train/state_passing.py), attached by the loop; its states
    #: travel with the checkpoint so that a resume is exact
    state_passing: Any = None

    def save(self, directory: Path) -> None:
        super().save(directory)
        if self.state_passing is not None:
            self.state_passing.save(directory, D.dist.get_rank())

    def load(self, directory: Path) -> None:
        super().load(directory)
        if self.state_passing is not None:
            self.state_passing.load(directory, D.dist.get_rank(), self.device)

    def forward_backward(self, batches: Sequence[Batch], *, nan_loss: bool = False) -> StepStats:
        if len(batches) != self.micro_batches:
            raise ValueError(f"forward_backward: {len(batches)} micro-batches, the engine was built for {self.micro_batches}")
        stats = StepStats()
        for i, batch in enumerate(batches):
            self._ds.set_gradient_accumulation_boundary(i == len(batches) - 1)
            ids, kwargs = to_device(batch, self.device)
            loss = self._ds(ids, **kwargs).loss if self._loss is None else self._loss(self._ds, ids, **kwargs)
            if nan_loss:
                loss = loss * float("nan")
            self._ds.backward(loss)
            if self._reports:
                stats.add(loss.detach().float().item(), ids.numel())
        return stats

    def step(self, skip: bool, *, grad_norm: bool = False) -> Optional[float]:
        # at ZeRO-0 the boundary's backward has reduced the gradients, so the local norm is the global one
        norm = local_grad_norm(self.module, self._tp_group) if grad_norm and self._own_norm else None
        # ZeRO may drop the update on its own (non-finite gradient norm); skipping is then a no-op
        with self.optimizer.skipping(skip):
            self._ds.step()
        if grad_norm and not self._own_norm:
            reported = self._ds.get_global_grad_norm()
            norm = float(reported) if reported is not None else None
        return norm


@contextmanager
def _writes_named(engine: Any) -> Iterator[None]:
    """DeepSpeed writes its files through ``engine.checkpoint_engine.save(state_dict, path)`` with
    ``torch.save``, which reports a full disk without naming the file; wrap it for this save so the
    error names the file."""
    writer = getattr(engine, "checkpoint_engine", None)
    if writer is None:
        yield
        return
    own = "save" in vars(writer)
    original = writer.save

    def save(state_dict: Any, path: str) -> Any:
        with layout.writing(Path(path)):
            return original(state_dict, path)

    writer.save = save
    try:
        yield
    finally:
        if own:
            writer.save = original
        else:
            del writer.save
