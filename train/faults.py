"""What the trainer does when things go wrong: non-finite losses and stop signals.

* A NaN/inf loss on *any* rank skips the optimizer update on *every* rank (the decision rides on
  the one all-reduce the loop already does per step), is counted, and after
  ``max_consecutive_nan`` skips in a row the run stops with ``TrainingDiverged`` naming the steps.
* SIGTERM / SIGUSR1 (Slurm's warning before a time limit, torchrun's shutdown) only set a flag;
  the loop sees it at the next step boundary, saves a checkpoint and exits 0. Nothing heavy ever
  runs inside a signal handler.
* Optionally (``train.spike_sigma > 0``) a loss far above the recent window (more than
  ``spike_sigma`` standard deviations over the mean of the last ``spike_window`` finite losses) is
  skipped the same way. The window lives in ``TrainerState`` so it survives a resume. After
  ``max_consecutive_nan`` spikes in a row the step is accepted: a lasting shift of the loss (new
  data, a schedule change) is not a spike.
* ``debug_nan_steps`` (config ``train.debug_nan_steps``) turns the loss of chosen steps into NaN:
  a testing aid to prove the skip path, never used in real runs.

Step numbers here (arguments, messages, ``debug_nan_steps``) are the ones metrics rows and
``step-N`` checkpoints use: step N is the N-th update, so checkpoint ``step-N`` is the first to
reflect (or, when skipped, to not reflect) it.
"""
from __future__ import annotations

import math
import signal
import sys
from types import FrameType
from typing import Iterable, Optional

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

    def poisons(self, step: int) -> bool:
        """Whether ``debug_nan_steps`` asks for NaN losses at ``step`` (the engine multiplies each loss
        by NaN, which keeps the graph intact: ``Engine.forward_backward(nan_loss=...)``)."""
        return step in self.debug_nan_steps

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


class SpikeGuard:
    """Skips updates whose loss is an outlier against the recent window (disabled when sigma <= 0)."""

    #: losses needed in the window before anything counts as a spike
    MIN_HISTORY = 16

    def __init__(self, sigma: float, window: int, max_consecutive: int) -> None:
        self.sigma, self.window, self.max_consecutive = sigma, window, max_consecutive

    def check(self, state: TrainerState, loss: float, step: int) -> bool:
        """Record a finite global step loss; True means skip this step's update."""
        history = state.loss_window
        if self.sigma > 0 and len(history) >= min(self.MIN_HISTORY, self.window):
            mean = sum(history) / len(history)
            std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
            threshold = mean + self.sigma * max(std, 1e-6 * abs(mean))
            if loss > threshold and state.consecutive_spikes < self.max_consecutive:
                state.spike_skipped += 1
                state.consecutive_spikes += 1
                print(f"[faults] step {step}: loss {loss:.4f} above the spike threshold {threshold:.4f} "
                      f"(mean {mean:.4f} + {self.sigma} sigma over {len(history)} steps); update skipped",
                      file=sys.stderr, flush=True)
                return True
        state.consecutive_spikes = 0
        history.append(loss)
        del history[: max(0, len(history) - self.window)]
        return False
