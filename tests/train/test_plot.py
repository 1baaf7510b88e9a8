"""``hybrid-lm plot``: PNG from a synthetic metrics file, key aliases, clear errors."""
import json
import math
import subprocess
import sys

import pytest

from hybrid_lm.train.plot import ema, read_metrics, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, prefixed=True, steps=60):
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            loss = 5 / s ** 0.5 + 0.2 * math.sin(s)
            row = {"train/loss": loss, "train/lr": 1e-3 * min(1, s / 10)} if prefixed else {"loss": loss, "lr": 1e-3}
            f.write(json.dumps({"step": s, "time": 0.0, **row}) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "time": 0.0, ("val/loss" if prefixed else "val_loss"): 5 / s ** 0.5}) + "\n")
        f.write('{"step": 61, "train/lo')  # a run killed mid-line


def plot_cli(*args):
    return subprocess.run([sys.executable, "-m", "hybrid_lm.cli", "plot", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_plot_cli_writes_png(tmp_path):
    write_metrics(tmp_path)
    result = plot_cli(tmp_path)
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR" and len(png) > 10_000


@pytest.mark.slow
def test_plot_cli_out_and_metrics(tmp_path):
    write_metrics(tmp_path, prefixed=False)
    out = tmp_path / "custom.png"
    result = plot_cli(tmp_path, "--out", out, "--metrics", "loss,val_loss")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC and not (tmp_path / "loss.png").exists()


def test_plot_cli_clear_errors(tmp_path):
    missing = plot_cli(tmp_path / "nope")
    assert missing.returncode == 2 and "no metrics file" in missing.stderr
    write_metrics(tmp_path)
    unknown = plot_cli(tmp_path, "--metrics", "perplexity")
    assert unknown.returncode == 2 and "none of perplexity was logged" in unknown.stderr


def test_series_aliases_and_ema(tmp_path):
    write_metrics(tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 66  # the truncated last line is dropped
    steps, val = series(records, "val_loss")
    assert steps == [10, 20, 30, 40, 50, 60] and val[0] == 5 / 10 ** 0.5
    assert series(records, "train/loss")[0] == series(records, "loss")[0] == list(range(1, 61))
    assert ema([1.0, 0.0, 0.0], alpha=0.5) == [1.0, 0.5, 0.25]


@pytest.mark.slow
def test_positions_png_from_the_newest_long_context_record(tmp_path):
    from hybrid_lm.train.plot import by_position, plot_run

    rows = [{"step": 5, "train/loss": 3.0}]
    for step in (5, 10):
        rec = {"step": step, "position_loss/0-7": 2.0, "position_loss/8-15": 1.9}
        for p in (16, 32, 48):
            rec |= {f"long_loss@{p}": 2.0 + p / step, f"long_state_rms/L0M@{p}": 0.1 * p,
                    f"long_state_rms/L0M.h0@{p}": 0.1 * p, f"long_decay/L0M.h0@{p}": 0.9}
        rows.append(rec)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    plot_run(tmp_path)
    png = (tmp_path / "positions.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    panels = by_position(rows[-1])
    assert panels["loss"]["long_loss"] == [(16, 3.6), (32, 5.2), (48, 6.8)]
    assert panels["loss"]["position_loss (training length)"] == [(8, 2.0), (16, 1.9)]
    assert set(panels["state_rms"]) == {"L0M", "L0M.h0"} and panels["decay"]["L0M.h0"][0] == (16, 0.9)
