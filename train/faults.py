"""What the trainer does when things go wrong: non-finite losses and stop signals.

* A NaN/inf loss on *any* rank skips the optimizer update on *every* rank (the decision rides on
  the one all-reduce the loop already does per step), is counted, and after
  ``max_consecutive_nan`` skips in a row the run stops with ``TrainingDiverged`` naming the steps.
* SIGTERM / SIGUSR1 (Slurm's warning before a time limit, torchrun's shutdown) only set a flag;
  the loop sees it at the next step boundary, saves a checkpoint and exits 0. Nothing heavy ever
  runs inside a signal handler.
* ``debug_nan_steps`` (config ``train.debug_nan_steps``) turns the loss of chosen steps into NaN:
  a testing aid to prove the skip path, never used in real runs.
"""
from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Iterable, Optional

import torch

from hybrid_lm.train.checkpoint.state import TrainerState


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


class StopSignal:
    """Context manager: SIGTERM/SIGUSR1 set ``requested``; previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class NanGuard:
    """Counts skipped steps in ``TrainerState`` (so the counters survive a resume)."""

    def __init__(self, max_consecutive: int, debug_nan_steps: Iterable[int] = ()) -> None:
        self.max_consecutive = max_consecutive
        self.debug_nan_steps = frozenset(debug_nan_steps)

    def inject(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss, or NaN for a step listed in ``debug_nan_steps`` (keeps the graph intact)."""
        return loss * float("nan") if step in self.debug_nan_steps else loss

    def record(self, state: TrainerState, finite: bool, step: int) -> bool:
        """Update counters after the global finite check; True means skip this step's update."""
        if finite:
            state.consecutive_nan = 0
            return False
        state.nan_skipped += 1
        state.consecutive_nan += 1
        print(f"[faults] step {step}: non-finite loss on at least one rank; update skipped "
              f"({state.consecutive_nan} in a row, {state.nan_skipped} in total)", file=sys.stderr, flush=True)
        if state.consecutive_nan >= self.max_consecutive:
            raise TrainingDiverged(
                f"{state.consecutive_nan} consecutive non-finite losses (steps {step - state.consecutive_nan + 1}"
                f"..{step}, limit train.max_consecutive_nan={self.max_consecutive}); stopping. Lower the learning "
                "rate or resume from an earlier checkpoint.")
        return True
