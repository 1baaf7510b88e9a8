"""``hybrid-lm plot RUN_DIR [--out PNG] [--metrics loss,val_loss]``: a run's loss curves to PNG.

Reads ``RUN_DIR/metrics.jsonl`` (train/metrics.py) and writes ``RUN_DIR/loss.png``: each train
metric raw (faint) and EMA-smoothed, each ``val*`` metric as points joined by a line, and the
learning rate on a twin axis when logged. Metric names match keys with or without the trainer's
section prefix (``loss`` matches ``train/loss``; ``val_loss`` matches ``val/loss``), so plots of
runs logged before and after a key rename look the same. Agg backend: works on headless nodes.

When the run logged evaluation scores by position (``position_loss/A-B``, and the ``long_context``
hook's ``long_loss@P``, ``long_state_rms/...@P``, ``long_decay/...@P``), the newest such record is
also drawn to ``RUN_DIR/positions.png``: loss by position, state RMS per layer (heads faint) and
Mamba-2's mean decay per head, side by side, so state collapse (loss and a few heads' state rising
past the training length) is visible at a glance.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional


def read_metrics(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file; a half-written last line (a killed run) is skipped."""
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
    return records


def _canonical(key: str) -> str:
    return key.removeprefix("train/").replace("val/", "val_")


def series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric ``name``, non-finite values (skipped NaN steps) dropped."""
    want = _canonical(name)
    steps, values = [], []
    for r in records:
        for key, value in r.items():
            if key not in ("step", "time") and _canonical(key) == want and isinstance(value, (int, float)) \
                    and math.isfinite(value):
                steps.append(r["step"])
                values.append(float(value))
                break
    return steps, values


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else (1 - alpha) * out[-1] + alpha * v)
    return out


def plot_run(run_dir: Path, out: Optional[Path] = None, metrics: tuple[str, ...] = ("loss", "val_loss")) -> Path:
    """Draw ``metrics`` (and lr) of ``run_dir`` to ``out`` (default RUN_DIR/loss.png); returns the path."""
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no metrics file at {metrics_file} (is {run_dir} a run directory?)")
    records = read_metrics(metrics_file)
    found = {m: series(records, m) for m in metrics}
    if not any(steps for steps, _ in found.values()):
        raise ValueError(f"{metrics_file}: none of {', '.join(metrics)} was logged")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = iter(["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"])
    for name, (steps, values) in found.items():
        if not steps:
            continue
        color = next(colors, None)
        if _canonical(name).startswith("val"):
            ax.plot(steps, values, "o-", color=color, linewidth=2, markersize=4, label=name)
        else:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=1, label=f"{name} (raw)")
            # about 20 points' memory: a 60-step smoke run and a 100k-step run both get a readable trend
            smooth = ema(values, alpha=max(0.002, min(0.3, 20 / len(values))))
            ax.plot(steps, smooth, color=color, linewidth=2, label=f"{name} (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)" if all("loss" in m for m in metrics) else "value")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    steps, lr = series(records, "lr")
    if steps:
        ax2 = ax.twinx()
        handles += ax2.plot(steps, lr, color="tab:gray", linestyle="--", linewidth=1)
        labels.append("lr")
        ax2.set_ylabel("learning rate")
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(run_dir.resolve().name)
    fig.tight_layout()
    out = out or run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    plot_positions(records, out.with_name("positions.png"), title=run_dir.resolve().name)
    return out


_AT = re.compile(r"^(long_loss|long_state_rms/|long_decay/)(.*)@(\d+)$")


def by_position(record: dict) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{panel: {line: [(position, value), ...]}} from one metrics record: panel ``loss`` (the
    ``position_loss`` buckets at their last position, ``long_loss``), ``state_rms``, ``decay``."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {"loss": {}, "state_rms": {}, "decay": {}}
    for key, value in record.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if key.startswith("position_loss/"):
            hi = int(key.rsplit("-", 1)[1]) + 1
            panels["loss"].setdefault("position_loss (training length)", []).append((hi, float(value)))
            continue
        m = _AT.match(key)
        if m is None:
            continue
        kind, line, pos = m.group(1), m.group(2), int(m.group(3))
        panel = {"long_loss": "loss", "long_state_rms/": "state_rms", "long_decay/": "decay"}[kind]
        panels[panel].setdefault(line or "long_loss", []).append((pos, float(value)))
    return {k: {line: sorted(v) for line, v in lines.items()} for k, lines in panels.items() if lines}


def plot_positions(records: list[dict], out: Path, title: str = "") -> Optional[Path]:
    """Draw the newest record with scores by position to ``out``; None (nothing written) when there is none."""
    panels: dict = {}
    for record in reversed(records):
        panels = by_position(record)
        if panels:
            break
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    labels = {"loss": "loss (nats/token)", "state_rms": "state RMS", "decay": "mean decay exp(dt·A)"}
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for line, points in lines.items():
            head = ".h" in line  # per-head lines faint, per-layer means bold
            ax.plot([p for p, _ in points], [v for _, v in points], "-" if head else "o-",
                    alpha=0.35 if head else 1.0, linewidth=1 if head else 2, label=None if head else line)
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel(labels[panel])
        if panel == "state_rms":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title} step {next((r.get('step') for r in reversed(records) if by_position(r)), '')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/loss.png)")
    parser.add_argument("--metrics", default="loss,val_loss",
                        help="comma-separated metric names (default loss,val_loss; 'train/' prefixes optional)")


def main(args: argparse.Namespace) -> int:
    names = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    try:
        path = plot_run(args.run_dir, args.out, names)
    except (FileNotFoundError, ValueError) as exc:
        print(f"hybrid-lm plot: {exc}", file=sys.stderr)
        return 2
    print(path)
    if path.with_name("positions.png").is_file():
        print(path.with_name("positions.png"))
    return 0
