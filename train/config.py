"""``JobConfig``: the one typed schema of a training job, read from YAML/TOML with dotted overrides.

    hybrid-lm train configs/debug.yaml train.steps=200 parallel.zero_stage=2

Each section is the config of the component that consumes it (``model`` -> HybridLM, ``data`` ->
the loader, ``optim`` -> AdamW, ``schedule`` -> the LR function, ``parallel`` -> DeepSpeed,
``checkpoint``, ``logging``, ``eval``, ``train`` -> this loop); components receive only their own
section. ``load_job_config`` validates everything (unknown keys, wrong types, impossible model
shapes, eval hook names after importing ``eval.plugins``) in the launching process, so a typo fails
before any worker starts, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from hybrid_lm.data.config import DataConfig
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.train.activation_checkpointing import check_activation_checkpointing
from hybrid_lm.train.checkpoint.manager import CheckpointConfig
from hybrid_lm.train.context_parallel.apply import check_context_parallel
from hybrid_lm.train.evaluation import EvalConfig, resolve_hooks
from hybrid_lm.train.optim import OptimConfig
from hybrid_lm.train.parallelize import ParallelConfig
from hybrid_lm.train.pipeline import check_pipeline
from hybrid_lm.train.schedules import ScheduleConfig, build_lr_schedule
from hybrid_lm.train.state_passing import check_state_passing
from hybrid_lm.train.sequence_parallel import check_sequence_parallel
from hybrid_lm.train.tensor_parallel import check_tensor_parallel
from hybrid_lm.typed_config import ConfigError, apply_overrides, from_dict, load_file, to_dict


@dataclass
class TrainConfig:
    steps: int = 1000
    """optimizer steps in total (a resumed run continues up to this number)"""
    seed: int = 0
    """seeds model init (identical on every rank and on resume) and the global RNGs"""
    run_dir: str = "runs/default"
    """metrics.jsonl, TensorBoard events and (by default) checkpoints/ go here"""
    resume: str = "auto"
    """auto: newest complete checkpoint in the run dir if any; never: start fresh; else a path"""
    init_from: Optional[str] = None
    """start from these weights (a model-only dir from ``hybrid-lm import`` or a training run/checkpoint);
    ignored when resuming, since the checkpoint already holds the weights"""
    stop_at: Optional[int] = None
    """checkpoint and exit 0 after this step (a job slot shorter than the run); the LR schedule
    still spans ``steps``, so a later resume continues exactly"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 disables)"""
    max_consecutive_nan: int = 5
    """abort after this many non-finite losses in a row (each one skips its update)"""
    spike_sigma: float = 0.0
    """skip an update whose loss exceeds the mean of the last ``spike_window`` losses by this many
    standard deviations (0 disables; 6 is a common choice)"""
    spike_window: int = 128
    """finite step losses the spike guard compares against"""
    eval_at_start: bool = True
    """run the eval hooks once before the first step of a fresh run (the 'before' number), whatever
    ``eval.every`` is"""
    debug_nan_steps: list[int] = field(default_factory=list)
    """testing aid: the loss of these steps is replaced by NaN to exercise the skip path"""
    state_passing: Literal["off", "carry", "noise"] = "off"
    """start each batch's Mamba-2 states from the same row's previous final states, detached
    (carry; needs data.row_streams) or from Gaussian noise (noise), against state collapse past the
    training length (train/state_passing.py); off: from zero, as usual"""
    state_noise_std: float = 0.1
    """standard deviation of the noise initial states (state_passing: noise)"""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"train.steps: must be >= 1, got {self.steps}")
        if self.max_consecutive_nan < 1:
            raise ConfigError(f"train.max_consecutive_nan: must be >= 1, got {self.max_consecutive_nan}")
        for name in ("grad_clip", "spike_sigma"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"train.{name}: must be >= 0 (0 disables), got {getattr(self, name)}")
        if self.spike_window < 1:
            raise ConfigError(f"train.spike_window: must be >= 1, got {self.spike_window}")
        if not 0 < self.state_noise_std < float("inf"):
            raise ConfigError(f"train.state_noise_std: must be > 0, got {self.state_noise_std}")
        if self.stop_at is not None and self.stop_at < 1:
            # the loop compares it with the step count after each step, so 0 would never stop the run
            raise ConfigError(f"train.stop_at: must be >= 1 or null, got {self.stop_at}")


@dataclass
class LoggingConfig:
    every: int = 10
    """log metrics (JSONL, TensorBoard, progress bar) every N steps"""
    tensorboard: bool = True
    """also write TensorBoard events when tensorboard is installed"""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"logging.every: must be >= 1, got {self.every}")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """The rules that span sections; each section has checked its own values already."""
        build_lr_schedule(self.schedule, self.train.steps, self.optim.lr)  # warm-up etc. against train.steps
        check_pipeline(self.model, self.parallel.pipeline_parallel)  # the pattern can make the stages
        # heads, groups, MLP width, vocab: each family's requirements
        check_tensor_parallel(self.model, self.parallel.tensor_parallel)
        check_sequence_parallel(self.data.seq_len, self.parallel)  # a TP group and seq_len it divides
        check_state_passing(self)  # row streams for carry, a carried layer, no model parallelism
        check_activation_checkpointing(self.model, self.parallel.activation_checkpointing,
                                       self.parallel.activation_checkpointing_layers)
        # slices divide the sequence, Ulysses heads, a CP forward for every stateful letter
        check_context_parallel(self.model, self.data.seq_len, self.parallel)
        self._check_recursion()
        self._check_hmt()

    def _check_recursion(self) -> None:
        loops = self.model.recursion.loops
        if loops == 1:
            return
        # the pipeline splits the pattern into stages and TP/CP wrap each layer once; a looped block
        # would need every stage to loop and per-loop LoRA sharded: untested, so refused
        self.parallel.refuse(("tensor_parallel", "pipeline_parallel", "context_parallel"),
                             f"model.recursion.loops={loops}", "a looped model trains with data parallelism / ZeRO only")

    def _check_hmt(self) -> None:
        if self.model.hmt is None:
            return
        if self.model.hmt.freeze_backbone and self.parallel.zero_stage > 0:
            # DeepSpeed's consolidation of a ZeRO checkpoint reads the optimizer's fp32 partitions,
            # which hold only trained parameters: a frozen backbone would be missing from exports
            raise ConfigError(f"model.hmt.freeze_backbone: needs parallel.zero_stage=0, got "
                              f"{self.parallel.zero_stage} (a ZeRO checkpoint consolidates only trained weights)")
        # the HMT wrapper runs its backbone once per segment on re-batched documents: tensor
        # parallelism splits each layer and works in every pass; stage cuts (PP) and sequence
        # shards (CP) are written for one pass of the stack over the whole row
        self.parallel.refuse(("pipeline_parallel", "context_parallel", "sequence_parallel"), "model.hmt",
                             "an HMT model trains with data and tensor parallelism / ZeRO")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.train.run_dir) / "checkpoints"


def job_config_from_dict(data: dict) -> JobConfig:
    return from_dict(JobConfig, data)


def load_job_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Read ``path`` (YAML/TOML/JSON), apply ``key.sub=value`` overrides, validate; ConfigError names the key."""
    cfg = job_config_from_dict(apply_overrides(load_file(path), overrides))
    resolve_hooks(cfg.eval)  # imports eval.plugins: a missing module or hook name fails in the launcher
    return cfg


def job_config_to_dict(cfg: JobConfig) -> dict:
    return to_dict(cfg)
