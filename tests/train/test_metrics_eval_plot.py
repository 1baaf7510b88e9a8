"""Metrics logging, MFU, eval hooks and the plot command."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm.models import HybridLM, ModelConfig
from hybrid_lm.train.evaluation import EvalConfig, EvalContext, passkey_prompt, run_evals
from hybrid_lm.train.metrics import MetricsLogger, mfu, peak_flops


def tiny_model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig(d_model=32, layer_pattern="--"))


def batches(n=3, b=2, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 258, (b, t), generator=g)
        labels = torch.randint(0, 258, (b, t), generator=g)
        labels[:, -3:] = -100
        out.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(t).expand(b, t),
                    "doc_ids": torch.zeros(b, t, dtype=torch.long)})
    return out


def test_val_loss_equals_hand_computed_cross_entropy():
    model, data = tiny_model(), batches()
    ctx = EvalContext(make_val_loader=lambda: iter(data), device=torch.device("cpu"), step=0)
    scores = run_evals(model, EvalConfig(hooks=["val_loss", "position_loss"], position_buckets=4), ctx)
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"]).logits for b in data])
    labels = torch.cat([b["labels"] for b in data])
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
    assert scores["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert scores["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    buckets = {k: v for k, v in scores.items() if k.startswith("val/position_loss/")}
    assert list(buckets) == ["val/position_loss/0-3", "val/position_loss/4-7", "val/position_loss/8-11",
                             "val/position_loss/12-15"]
    # the last bucket holds 1 real position of 4 per row (3 are -100): weight by token counts
    weights = [4, 4, 4, 1]
    weighted = sum(w * v for w, v in zip(weights, buckets.values())) / sum(weights)
    assert weighted == pytest.approx(expected, rel=1e-5)
    assert model.training


def test_reduce_is_applied_and_max_batches_respected():
    model, data = tiny_model(), batches(n=4)
    seen = []
    ctx = EvalContext(make_val_loader=lambda: iter(data), device=torch.device("cpu"), step=0,
                      reduce=lambda v: seen.append(v) or v * 2)
    scores = run_evals(model, EvalConfig(hooks=["val_loss"], max_batches=1), ctx)
    assert len(seen) == 2 and seen[1] == (data[0]["labels"] != -100).sum().item()
    only_first = run_evals(model, EvalConfig(hooks=["val_loss"], max_batches=1),
                           EvalContext(make_val_loader=lambda: iter(data[:1]), device=torch.device("cpu"), step=0))
    assert scores["val/loss"] == pytest.approx(only_first["val/loss"])


def test_unknown_hook_names_it():
    ctx = EvalContext(make_val_loader=lambda: iter([]), device=torch.device("cpu"), step=0)
    with pytest.raises(KeyError, match="'nope'.*known: .*val_loss"):
        run_evals(tiny_model(), EvalConfig(hooks=["nope"]), ctx)


def test_passkey_prompt_and_hook():
    prompt, answer = passkey_prompt(300, 0.5, 12345)
    assert len(prompt) == 300 and prompt.count("12345") == 2 and answer == "12345"
    ctx = EvalContext(make_val_loader=lambda: iter([]), device=torch.device("cpu"), step=3)
    scores = run_evals(tiny_model(), EvalConfig(hooks=["passkey"], passkey_lengths=[128], passkey_trials=2), ctx)
    assert scores["val/passkey/128"] in (0.0, 0.5, 1.0)


def test_metrics_logger_writes_rank0_only(tmp_path):
    MetricsLogger(tmp_path / "r1", rank=1).log(1, {"a": 1.0})
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()
    log = MetricsLogger(tmp_path / "r0", rank=0)
    log.log(1, {"train/loss": 2.5})
    log.log(2, {"train/loss": 2.0})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/loss"] == 2.0 and "time" in rows[0]


def test_mfu_convention():
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1e9, 1000.0, None) is None
    assert mfu(6e9, 1e4, 989e12) == pytest.approx(6e13 / 989e12)


def test_plot_cli_writes_png(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 30):
            f.write(json.dumps({"step": s, "train/loss": 5 / s, "train/lr": 1e-3}) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "val/loss": 5 / s + 0.1}) + "\n")
    result = subprocess.run([sys.executable, "-m", "hybrid_lm.cli", "plot", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, "-m", "hybrid_lm.cli", "plot", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no metrics file" in missing.stderr
