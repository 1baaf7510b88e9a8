"""The loop and the checkpoint manager need nothing from an engine beyond train/engine.py's interface:
a plain-PyTorch engine (no DeepSpeed) trains, skips a NaN step, saves and resumes exactly."""
import math

import torch

import synthetic
from hybrid_lm.train import loop
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.engine import Engine, StepStats, to_device
from hybrid_lm.train.optim import build_optimizer, set_lr


class TorchEngine:
    """One process, AdamW, gradient accumulation by hand: the smallest engine the loop can run."""

    def __init__(self, model, cfg, device):
        self.module, self.device = model.to(device), device
        self.optimizer = build_optimizer(model, cfg.optim)
        self.micro_batches = cfg.parallel.gradient_accumulation
        self.data_rank, self.data_size = 0, 1
        self.checkpoint_layout = {"engine": "torch"}
        self.steps_taken = 0

    def set_lr(self, lr):
        set_lr(self.optimizer, lr)

    def forward_backward(self, batches, *, nan_loss=False):
        stats = StepStats()
        for batch in batches:
            ids, kwargs = to_device(batch, self.device)
            loss = self.module(ids, **kwargs).loss
            if nan_loss:
                loss = loss * float("nan")
            (loss / len(batches)).backward()
            stats.add(loss.item(), ids.numel())
        return stats

    def step(self, skip, *, grad_norm=False):
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.module.parameters()]))
        with self.optimizer.skipping(skip):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 0 if skip else 1
        return norm if grad_norm else None

    def save(self, directory):
        torch.save({"model": self.module.state_dict(), "optim": self.optimizer.state_dict()}, directory / "torch.pt")

    def load(self, directory):
        blob = torch.load(directory / "torch.pt", weights_only=True)
        self.module.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optim"])


def _run(run_dir, monkeypatch, engines, **kw):
    def build(model, cfg, info):
        engines.append(TorchEngine(model, cfg, info.device))
        return engines[-1]

    monkeypatch.setattr(loop, "build_engine", build)
    job = synthetic.job_dict(run_dir, steps=6, gas=2, train={"debug_nan_steps": [2], **kw.pop("train", {})}, **kw)
    return loop.train(job_config_from_dict(job), make_loader=synthetic.factory())


def test_a_plain_torch_engine_trains_skips_and_resumes_through_the_interface(tmp_path, monkeypatch):
    engines = []
    straight = _run(tmp_path / "a", monkeypatch, engines)
    assert isinstance(engines[0], Engine)
    assert math.isnan(straight.losses[1]) and engines[0].steps_taken == 5  # step 2 was skipped
    assert straight.losses[5] < straight.losses[0]
    first = _run(tmp_path / "b", monkeypatch, engines, train={"stop_at": 3})
    second = _run(tmp_path / "b", monkeypatch, engines)
    assert sorted(second.losses) == [3, 4, 5]
    merged = {**first.losses, **second.losses}
    assert merged.keys() == straight.losses.keys()
    for step, loss in straight.losses.items():
        assert (math.isnan(loss) and math.isnan(merged[step])) or merged[step] == loss, step  # bitwise
    import json

    marker = json.loads((second.checkpoint / "COMPLETE.json").read_text())
    assert marker["layout"] == {"engine": "torch"}
