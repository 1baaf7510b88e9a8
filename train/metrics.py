"""Metrics out of the training loop: JSONL always, TensorBoard when installed, a rank-0 progress bar, MFU.

    logger = MetricsLogger(run_dir, rank, tensorboard=cfg.logging.tensorboard)
    meter = Throughput(window=20)
    ...  # each step: rate = meter.update(tokens_this_step)
    logger.log(step, {"train/loss": loss, "train/tokens_per_s": rate, "train/mfu": mfu(fpt, rate, peak)})

MFU convention (Megatron's): training FLOPs per token = 3 x forward FLOPs per token
(the backward pass costs twice the forward), forward FLOPs from ``HybridLM.flops_per_token`` (matmuls
2*m*n, the causal attention core counted once over the real packed context). ``mfu`` takes the
*training* FLOPs per token (already x3) and the tokens/s of one device, against that device's dense
bf16 peak (``GPUS``: H100 SXM and H200: 989 TFLOP/s, H100 PCIe: 756, H100/H200 NVL: 835, A100: 312).
Rank 0's tokens/s divided by the world size is one device's rate when the ranks run in lockstep, as
data parallelism does.
"""
from __future__ import annotations

import collections
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

@dataclass(frozen=True)
class GpuSpec:
    name: str
    """as tables print it"""
    match: str
    """substring of ``torch.cuda.get_device_name`` that identifies the card"""
    peak_bf16: float
    """dense bf16 tensor-core peak (no structured sparsity), FLOP/s, from NVIDIA's datasheets"""
    memory_gib: float
    """total memory as nvidia-smi reports it (MiB / 1024)"""


# ``hybrid-lm plan --gpu KEY``. Matched against the device name in this order: the NVL and PCIe cards
# name themselves "H100 NVL" / "H100 PCIe" and have lower clocks than the SXM one ("H100 80GB HBM3");
# the A100's 40 and 80 GB variants share one peak, so the first A100 entry serves the name match.
GPUS: dict[str, GpuSpec] = {
    "h200-nvl": GpuSpec("H200 NVL", "H200 NVL", 835e12, 143771 / 1024),
    "h200": GpuSpec("H200 SXM", "H200", 989e12, 143771 / 1024),
    "h100-nvl": GpuSpec("H100 NVL", "H100 NVL", 835e12, 95830 / 1024),
    "h100-pcie": GpuSpec("H100 PCIe", "H100 PCIe", 756e12, 81559 / 1024),
    "h100": GpuSpec("H100 SXM", "H100", 989e12, 81559 / 1024),
    "a100": GpuSpec("A100 80GB", "A100", 312e12, 81920 / 1024),
    "a100-40gb": GpuSpec("A100 40GB", "A100", 312e12, 40960 / 1024),
}


def gpu_spec(device: torch.device) -> Optional[GpuSpec]:
    """The table entry of a CUDA device by name; None on CPU or an unknown card."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((spec for spec in GPUS.values() if spec.match in name), None)


def peak_flops(device: torch.device) -> Optional[float]:
    """The dense bf16 peak of a CUDA device by name; None on CPU or an unknown card."""
    spec = gpu_spec(device)
    return spec.peak_bf16 if spec else None


def mfu(flops_per_token: float, tokens_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]: ``flops_per_token`` (training = 3 x forward) x tokens/s of
    one device over its ``peak``; None when the peak is unknown (CPU)."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / peak


class Throughput:
    """Tokens/s over the last ``window`` steps, so a slow first step (compilation, warm-up) or an
    eval pause fades out instead of dragging the whole-run average. Call ``reset()`` after a pause."""

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        # (end time, tokens of the step that ended then); the first mark only sets the start time
        self._marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)
        self.reset()

    def reset(self, now: Optional[float] = None) -> None:
        """Start timing afresh from ``now`` (default: the current time)."""
        self._marks.clear()
        self._marks.append((time.perf_counter() if now is None else now, 0))

    def update(self, tokens: int, now: Optional[float] = None) -> float:
        """Record a finished step of ``tokens`` tokens; returns tokens/s over the window."""
        self._marks.append((time.perf_counter() if now is None else now, tokens))
        return self.tokens_per_s

    @property
    def tokens_per_s(self) -> float:
        if len(self._marks) < 2:
            return 0.0
        elapsed = self._marks[-1][0] - self._marks[0][0]
        tokens = sum(t for _, t in list(self._marks)[1:])
        return tokens / elapsed if elapsed > 0 else 0.0


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
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: tail -f and crashes
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("logging.tensorboard is set but tensorboard is not installed "
                              "(pip install 'hybrid-lm[tensorboard]'); logging to metrics.jsonl only",
                              RuntimeWarning, stacklevel=2)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            return
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
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
    """A tqdm bar over optimizer steps on rank 0 (none elsewhere), showing loss, tokens/s, lr, MFU.

    ``disable=None`` follows tqdm's own rule (off when the output is not a terminal, as in a batch
    job's log); True or False force it."""

    def __init__(self, total_steps: int, initial_step: int, rank: int, disable: Optional[bool] = None) -> None:
        self._bar = None
        self._step = initial_step
        if rank != 0 or disable is True:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                         disable=disable)

    def update(self, step: int, **postfix: Optional[float]) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._step)
        self._step = step
        self._bar.set_postfix(format_postfix(postfix), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_postfix(values: dict[str, Optional[float]]) -> dict[str, str]:
    """Short human forms for the bar: tokens/s with thousands separators, MFU in percent, lr in e-notation."""
    shown = {}
    for key, value in values.items():
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
    return shown
