"""``hybrid-lm plot RUN_DIR [--out PNG] [--metrics loss,val_loss]``: a run's loss curves to PNG.

Reads ``RUN_DIR/metrics.jsonl`` (train/metrics.py) and writes ``RUN_DIR/loss.png``: each train
metric raw (faint) and EMA-smoothed, each ``val*`` metric as points joined by a line, and the
learning rate on a twin axis when logged. Metric names match keys with or without the trainer's
section prefix (``loss`` matches ``train/loss``; ``val_loss`` matches ``val/loss``), so plots of
runs logged before and after a key rename look the same. Agg backend: works on headless nodes.
"""
from __future__ import annotations

import argparse
import json
import math
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
    return 0
