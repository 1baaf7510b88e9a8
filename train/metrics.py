"""Metrics out of the training loop: JSONL always, TensorBoard when installed, a rank-0 progress bar, MFU.

MFU convention (PERFORMANCE.md, Megatron's): training FLOPs per token = 3 x forward FLOPs per token
(forward + backward), forward FLOPs from ``HybridLM.flops_per_token`` (matmuls 2*m*n, the causal
attention core counted once over the average context). ``mfu`` takes the *training* FLOPs per token
(the loop multiplies by 3) and the tokens/s of one device, against the dense bf16 peak of that device.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> Optional[float]:
    """The dense bf16 peak of a CUDA device by name; None on CPU or an unknown card."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAKS.items():
        if key in name:
            return value
    return None


def mfu(train_flops_per_token: float, tokens_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]: achieved training FLOP/s of one device over its peak."""
    if not peak:
        return None
    return train_flops_per_token * tokens_per_s / peak


class MetricsLogger:
    """Rank 0 appends one JSON object per ``log`` call to ``run_dir/metrics.jsonl`` (with ``step``
    and wall ``time``); other ranks do nothing. Appending keeps a resumed run's history in one file."""

    def __init__(self, run_dir: Path | str, rank: int, tensorboard: bool = False) -> None:
        self.rank = rank
        self._file = None
        self._tb = None
        if rank != 0:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("logging.tensorboard is set but tensorboard is not installed "
                              "(pip install 'hybrid-lm[tensorboard]'); logging to metrics.jsonl only")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            return
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class TrainProgress:
    """A tqdm bar over optimizer steps on rank 0 (none elsewhere), showing loss, tokens/s, lr, MFU."""

    def __init__(self, total_steps: int, initial_step: int, rank: int, disable: Optional[bool] = None) -> None:
        self._bar = None
        if rank == 0 and not disable:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        self._step = initial_step

    def update(self, step: int, **postfix: Optional[float]) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._step)
        self._step = step
        shown = {}
        for key, value in postfix.items():
            if value is None:
                continue
            if key == "tokens_per_s":
                shown["tok/s"] = f"{value:,.0f}"
            elif key == "mfu":
                shown["mfu"] = f"{100 * value:.1f}%"
            elif key == "lr":
                shown["lr"] = f"{value:.2e}"
            else:
                shown[key] = f"{value:.4f}"
        self._bar.set_postfix(shown, refresh=False)
        if step >= self._bar.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
