"""Metrics: JSONL logging on rank 0, TensorBoard fallback, progress bar, throughput window, MFU."""
import io
import json
import warnings

import pytest
import torch

from hybrid_lm.train.metrics import MetricsLogger, Throughput, TrainProgress, format_postfix, mfu, peak_flops


def test_logger_writes_rank0_only_and_appends(tmp_path):
    MetricsLogger(tmp_path / "r1", rank=1).log(1, {"a": 1.0})
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()
    log = MetricsLogger(tmp_path / "r0", rank=0)
    log.log(1, {"train/loss": 2.5})
    log.log(2, {"train/loss": torch.tensor(2.0)})
    log.close()
    resumed = MetricsLogger(tmp_path / "r0", rank=0)
    resumed.log(3, {"val_loss": 1.5})
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["train/loss"] == 2.0 and rows[2]["val_loss"] == 1.5
    assert all(isinstance(r["time"], float) for r in rows)


def test_tensorboard_missing_warns_and_still_logs(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.warns(RuntimeWarning, match="tensorboard is not installed"):
        log = MetricsLogger(tmp_path, rank=0, tensorboard=True)
    log.log(1, {"x": 1.0})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["x"] == 1.0


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLogger(tmp_path, rank=0, tensorboard=True)
    log.log(1, {"train/loss": 3.0})
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_throughput_is_a_sliding_window():
    meter = Throughput(window=2)
    meter.reset(now=0.0)
    assert meter.update(100, now=10.0) == pytest.approx(10.0)  # a slow first step
    assert meter.update(100, now=11.0) == pytest.approx(200 / 11)
    # the slow step has left the window of 2: (100 + 100) tokens over 2 s
    assert meter.update(100, now=12.0) == pytest.approx(100.0)
    meter.reset(now=100.0)  # an eval pause does not count
    assert meter.tokens_per_s == 0.0
    assert meter.update(50, now=100.5) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        Throughput(window=0)


def test_progress_bar_rank0_only(monkeypatch):
    assert TrainProgress(10, 0, rank=1, disable=False)._bar is None
    assert TrainProgress(10, 0, rank=0, disable=True)._bar is None
    bar = TrainProgress(10, 3, rank=0, disable=False)
    out = io.StringIO()
    bar._bar.fp = out
    bar.update(5, loss=2.0, tokens_per_s=12345.6, lr=3e-4, mfu=0.4123)
    assert bar._bar.n == 5
    postfix = bar._bar.postfix
    assert "tok/s=12,346" in postfix and "mfu=41.2%" in postfix and "lr=3.00e-04" in postfix
    bar.close()
    bar.update(6, loss=1.0)  # after close: a no-op, not an error


def test_format_postfix_skips_missing_values():
    assert format_postfix({"loss": 1.23456, "mfu": None}) == {"loss": "1.2346"}


def test_peak_flops_by_device_name(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, expected in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                           ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("Tesla T4", None),
                           ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(torch.device("cuda", 0)) == expected, name


def test_mfu_by_hand():
    assert mfu(1e9, 1000.0, None) is None
    # 6e9 training FLOPs/token (a 1B dense model) at 50k tokens/s on one H100 SXM:
    # 6e9 * 5e4 = 3e14 FLOP/s of 989e12 -> 30.33%
    assert mfu(6e9, 5e4, 989e12) == pytest.approx(0.30334, abs=1e-5)


def test_logged_mfu_is_three_forward_passes_at_the_logged_rate(tmp_path, monkeypatch):
    """The loop's train/mfu, recomputed by hand from the logged tokens/s: an A- stack with
    d=32, 4 heads, MLP 64, vocab 64 at T=32 does per token (2 FLOPs per multiply-add)
    q,k,v,o 4 x 2*32*32 = 8192, QK^T and AV 2 x 2*32 x 16.5 keys (causal mean over 32) = 2112,
    MLP 3 x 2*32*64 = 12288, LM head 2*32*64 = 4096: 26688 forward, x3 for training."""
    import synthetic
    from hybrid_lm.train import loop
    from hybrid_lm.train.config import job_config_from_dict

    monkeypatch.setattr(loop, "peak_flops", lambda device: 1e9)
    cfg = synthetic.job_dict(tmp_path, steps=3, model={"layer_pattern": "A-", "attention": {"n_heads": 4},
                                                       "mlp": {"hidden_size": 64}})
    loop.train(job_config_from_dict(cfg), make_loader=synthetic.factory())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/mfu" in r]
    assert len(logged) == 3
    for r in logged:
        assert r["train/mfu"] == pytest.approx(3 * 26688 * r["train/tokens_per_s"] / 1e9, rel=1e-9)
