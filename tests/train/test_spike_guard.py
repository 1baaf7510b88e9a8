"""The optional loss-spike guard: an outlier loss skips its update on every
rank, is counted, and the window it compares against survives a resume bitwise."""
import pytest
import torch

import synthetic
from hybrid_lm.train.checkpoint import layout, load_model_state
from hybrid_lm.train.checkpoint.state import TrainerState
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.faults import SpikeGuard
from hybrid_lm.train.loop import train

POISONED_STEP = 50


class PoisonedLoader(synthetic.SyntheticLoader):
    """The synthetic stream, except one batch of uniformly random tokens (an unlearnable spike)."""

    def _batch(self, n):
        batch = super()._batch(n)
        if self.split == "train" and n == POISONED_STEP:
            g = torch.Generator().manual_seed(n)
            batch["labels"] = torch.randint(self.vocab, batch["labels"].shape, generator=g)
        return batch


def poisoned_factory():
    return lambda split, rank, world_size: PoisonedLoader(split, rank, world_size)


def _run(run_dir, **train_section):
    job = synthetic.job_dict(run_dir, steps=56, checkpoint={"every": 1, "keep": 60}, optim={"lr": 1e-2},
                             train={"spike_sigma": 6.0, "spike_window": 16, **train_section})
    return train(job_config_from_dict(job), make_loader=poisoned_factory())


def test_guard_unit_rules():
    guard = SpikeGuard(sigma=3.0, window=4, max_consecutive=2)
    state = TrainerState()
    assert not any(guard.check(state, x, i) for i, x in enumerate([1.0, 1.1, 0.9, 1.0]))  # fills the window
    assert guard.check(state, 5.0, 4) and guard.check(state, 5.0, 5)  # two spikes skipped
    assert not guard.check(state, 5.0, 6)  # third in a row: a lasting shift, accepted
    assert state.spike_skipped == 2 and state.loss_window[-1] == 5.0 and len(state.loss_window) == 4
    assert not SpikeGuard(sigma=0.0, window=4, max_consecutive=2).check(TrainerState(loss_window=[1.0] * 4), 1e9, 0)


@pytest.mark.slow
def test_poisoned_batch_is_skipped_and_changes_nothing(tmp_path, capsys):
    result = _run(tmp_path)
    assert result.state.spike_skipped == 1
    assert result.losses[POISONED_STEP] > 2 * result.losses[POISONED_STEP - 1]
    before, after = (load_model_state(tmp_path / "checkpoints" / layout.step_dir_name(s)).state_dict
                     for s in (POISONED_STEP, POISONED_STEP + 1))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the poisoned batch feeds the update from step count 50 to 51: step 51 in metrics and checkpoints
    assert f"step {POISONED_STEP + 1}: loss" in capsys.readouterr().err


@pytest.mark.slow
def test_guard_window_survives_resume_bitwise(tmp_path):
    straight = _run(tmp_path / "a")
    first = _run(tmp_path / "b", stop_at=POISONED_STEP - 2)
    second = _run(tmp_path / "b")
    assert second.state.spike_skipped == 1
    assert {**first.losses, **second.losses} == straight.losses
    a, b = load_model_state(straight.checkpoint), load_model_state(second.checkpoint)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
