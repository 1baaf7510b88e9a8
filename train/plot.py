"""``hybrid-lm plot RUN_DIR``: loss curves of a run to PNG (train loss raw and smoothed, val loss, lr).

Reads ``RUN_DIR/metrics.jsonl`` (written by train/metrics.py) and writes ``RUN_DIR/loss.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r and r[key] == r[key]]  # drop NaN (skipped steps)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no metrics file at {metrics_file} (is {run_dir} a run directory?)")
    records = read_metrics(metrics_file)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps, loss = series(records, "train/loss")
    if steps:
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, ema(loss), color="tab:blue", linewidth=2, label="train loss (EMA)")
    steps, val = series(records, "val/loss")
    if steps:
        ax.plot(steps, val, "o-", color="tab:red", linewidth=2, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    steps, lr = series(records, "train/lr")
    handles, labels = ax.get_legend_handles_labels()
    if steps:
        ax2 = ax.twinx()
        line = ax2.plot(steps, lr, color="tab:gray", linestyle="--", linewidth=1, label="lr")
        ax2.set_ylabel("learning rate")
        handles += line
        labels += ["lr"]
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = out or run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/loss.png)")


def main(args: argparse.Namespace) -> int:
    try:
        path = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"hybrid-lm plot: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
