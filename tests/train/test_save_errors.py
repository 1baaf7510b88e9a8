"""A disk that fills up during a save: one clear error naming the file and the cause, nothing half
written left marked complete, and the run resumes from the previous checkpoint once there is room.

No tiny filesystem is available to tests, so the writers are made to fail as they do on a full disk:
our own files with ``OSError(ENOSPC)``, DeepSpeed's ``torch.save`` with the internal error torch
raises there (no errno), while the filesystem reports no free space.
"""
import collections
import errno
import os
import shutil

import pytest
import torch

import synthetic
from hybrid_lm.train.checkpoint import CheckpointError, layout, load_model_state
from hybrid_lm.train.checkpoint import state as state_module
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.loop import train

FAILING = layout.step_dir_name(4) + ".tmp"


def _run(run_dir, steps=4):
    job = synthetic.job_dict(run_dir, steps=steps, checkpoint={"every": 2, "keep": 2})
    return train(job_config_from_dict(job), make_loader=synthetic.factory())


def _fail_our_writer(monkeypatch):
    real = state_module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if FAILING in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(state_module, "save_file", save_file)
    return "rank-00000.rng.safetensors: No space left on device"


def _fail_torch_save(monkeypatch):
    real, real_usage = torch.save, shutil.disk_usage

    def save(obj, f, *args, **kwargs):
        if FAILING in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, f, *args, **kwargs)

    def disk_usage(path):
        usage = real_usage(path)
        return collections.namedtuple("usage", "total used free")(usage.total, usage.total, 0)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return "mp_rank_00_model_states.pt: No space left on device (0 bytes free; torch: [enforce fail"


@pytest.mark.parametrize("fail", [_fail_our_writer, _fail_torch_save], ids=["oserror", "torch"])
def test_full_disk_during_save_is_one_clear_error_and_loses_nothing(tmp_path, monkeypatch, fail):
    expected = fail(monkeypatch)
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError) as info:
        _run(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint step 4 not saved: {root / FAILING}" in message and expected in message, message
    assert "the newest complete checkpoint is still step-0000002" in message
    assert not (root / FAILING).exists() and not (root / layout.step_dir_name(4)).exists()
    assert (root / "latest").read_text().strip() == "step-0000002"
    assert layout.newest_complete(root) == root / "step-0000002"
    monkeypatch.undo()  # room again
    resumed = _run(tmp_path)
    assert sorted(resumed.losses) == [2, 3] and load_model_state(tmp_path).step == 4


def _rank1_disk_full_worker(rank, world_size, job):
    if rank == 1:
        from _pytest.monkeypatch import MonkeyPatch

        _fail_our_writer(MonkeyPatch())
    try:
        train(job_config_from_dict(job), make_loader=synthetic.factory())
    except CheckpointError as exc:
        return str(exc)
    return None


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_failing_to_write_stops_every_rank_without_a_hang(tmp_path):
    from distributed_utils import run_distributed

    job = synthetic.job_dict(tmp_path, steps=4, zero_stage=2, checkpoint={"every": 2, "keep": 2},
                             parallel={"timeout_s": 60})  # before the fix rank 0 waited here for rank 1
    messages = run_distributed(_rank1_disk_full_worker, 2, args=(job,), timeout_s=240)
    assert "rank-00001.rng.safetensors: No space left on device" in messages[1]
    assert "another rank could not write its files" in messages[0]
    assert all("the newest complete checkpoint is still step-0000002" in m for m in messages)
    root = tmp_path / "checkpoints"
    assert not (root / FAILING).exists() and layout.newest_complete(root) == root / "step-0000002"


def test_a_resave_that_cannot_write_its_marker_keeps_the_old_copy_of_that_step(tmp_path, monkeypatch):
    _run(tmp_path, steps=2)
    old = tmp_path / "checkpoints" / layout.step_dir_name(2)
    before = layout.verify(old)
    real = layout.write_json_atomic

    def write_json_atomic(path, data):
        if path.name == layout.MARKER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".tmp")
        return real(path, data)

    monkeypatch.setattr(layout, "write_json_atomic", write_json_atomic)
    job = synthetic.job_dict(tmp_path, steps=2, checkpoint={"every": 2, "keep": 2}, train={"resume": "never"})
    with pytest.raises(CheckpointError, match="COMPLETE.json.tmp: No space left on device"):
        train(job_config_from_dict(job), make_loader=synthetic.factory())
    assert layout.verify(old) == before  # the first run's step 2, intact
    assert sorted(p.name for p in old.parent.iterdir()) == ["latest", "step-0000002"]
