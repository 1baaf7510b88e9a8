"""Loading a checkpoint never runs code from it: DeepSpeed's ``ds/*.pt`` files go
through weights-only unpickling with a minimal allowlist, on resume and in ``load_model_state``.

The attack: replace one of DeepSpeed's files with a pickle whose ``__reduce__`` calls ``os.system``
and recompute ``COMPLETE.json`` (the marker proves integrity, not origin). Every path must refuse
it with a CheckpointError naming the file, and the payload's marker file must never appear.
"""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import synthetic
from distributed_utils import run_distributed
from hybrid_lm.train.checkpoint import CheckpointError, layout, load_model_state
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.loop import train

STAGES = [0, 1, 2, 3]


def _run(run_dir, **kw):
    return train(job_config_from_dict(synthetic.job_dict(run_dir, **kw)), make_loader=synthetic.factory())


class _Payload:
    """What an attacker ships: unpickling it runs a shell command (here: create a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(ckpt: Path, victim_glob: str, marker: Path, *, raw: bool) -> Path:
    """Replace the first ``ds/`` file matching ``victim_glob`` and re-sign the checkpoint."""
    victim = sorted((ckpt / "ds").glob(victim_glob))[0]
    if raw:  # a bare pickle stream, not torch.save's zip: torch.load's legacy path unpickles it
        victim.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:  # a well-formed torch.save archive around the payload
        torch.save({"module": _Payload(marker)}, victim)
    layout.write_marker(ckpt, _marker_meta(ckpt))
    layout.verify(ckpt)  # the forged checkpoint passes the integrity check
    return victim


def _marker_meta(ckpt: Path) -> dict:
    return {k: v for k, v in json.loads((ckpt / layout.MARKER).read_text()).items() if k != "files"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """One 2-step run dir per ZeRO stage (checkpoint at step 2)."""
    root = tmp_path_factory.mktemp("safe-loading")
    for stage in STAGES:
        _run(root / f"z{stage}", steps=2, zero_stage=stage)
    return {stage: root / f"z{stage}" for stage in STAGES}


def _copy(runs, stage, tmp_path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(runs[stage], run_dir)
    return run_dir, run_dir / "checkpoints" / layout.step_dir_name(2)


# the file each stage keeps DeepSpeed's objects in (optimiser state), and the module file
VICTIMS = [(0, "mp_rank_*_model_states.pt"), (1, "*optim_states.pt"), (2, "*optim_states.pt"),
           (2, "mp_rank_*_model_states.pt"), (3, "*optim_states.pt"), (3, "*model_states.pt")]


# both ways into a checkpoint: resume through DeepSpeed's engine, and consolidation (export, eval, init_from)
ENTRY_POINTS = {"resume": lambda run_dir, stage: _run(run_dir, steps=4, zero_stage=stage),
                "load_model_state": lambda run_dir, stage: load_model_state(run_dir)}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
@pytest.mark.parametrize("stage,victim_glob", VICTIMS)
def test_forged_deepspeed_file_is_refused(runs, tmp_path, stage, victim_glob, raw, entry):
    run_dir, ckpt = _copy(runs, stage, tmp_path)
    marker = tmp_path / "pwned"
    victim = _plant(ckpt, victim_glob, marker, raw=raw)
    with pytest.raises(CheckpointError, match=rf"{victim.name}: refusing to unpickle"):
        ENTRY_POINTS[entry](run_dir, stage)
    assert not marker.exists(), f"the payload ran during {entry}"


@pytest.mark.parametrize("stage,victim_glob", [(0, "mp_rank_*_model_states.pt"), (2, "*optim_states.pt"),
                                               (3, "*optim_states.pt")])
def test_weights_only_holds_even_when_the_prescan_is_bypassed(runs, tmp_path, monkeypatch, stage, victim_glob):
    """The static scan only names the file early; the guarantee is the forced weights-only load
    inside DeepSpeed and zero_to_fp32 (which pass weights_only=False themselves)."""
    from hybrid_lm.train.checkpoint import safe_load

    monkeypatch.setattr(safe_load, "scan", lambda ds_dir: [])
    run_dir, ckpt = _copy(runs, stage, tmp_path)
    marker = tmp_path / "pwned"
    _plant(ckpt, victim_glob, marker, raw=False)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*posix\.system"):
        _run(run_dir, steps=4, zero_stage=stage)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*posix\.system"):
        load_model_state(run_dir)
    assert not marker.exists()


def test_scope_forces_weights_only_and_restores_everything(tmp_path, monkeypatch):
    from hybrid_lm.train.checkpoint import safe_load

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # would otherwise clash inside the scope
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload(marker)}, evil)
    before = set(torch.serialization.get_safe_globals())
    with pytest.raises(CheckpointError, match=r"evil\.pt: refusing to unpickle.*posix\.system"):
        with safe_load.weights_only_loads(tmp_path):
            with safe_load.weights_only_loads(tmp_path):  # nested: the inner exit must not drop the outer's guard
                pass
            torch.load(evil, weights_only=False)  # what DeepSpeed passes
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert set(torch.serialization.get_safe_globals()) == before


def test_allowlist_is_exactly_what_deepspeed_checkpoints_contain(runs):
    """Every entry is needed by some stage and nothing else is: a DeepSpeed upgrade that pickles a
    new class shows up here (and as a refusal naming it), not as a silently widened allowlist."""
    from hybrid_lm.train.checkpoint import safe_load

    found: set[str] = set()
    for run_dir in runs.values():
        ckpt = run_dir / "checkpoints" / layout.step_dir_name(2)
        for f in (ckpt / "ds").glob("*.pt"):
            found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    assert found == {f"{c.__module__}.{c.__qualname__}" for c in safe_load.allowlist()}


@pytest.mark.parametrize("stage", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_exact_resume_through_weights_only_loads(tmp_path, stage):
    """ZeRO 0 and 2 are covered by test_engine.test_exact_resume_single_process; 1 and 3 here."""
    straight = _run(tmp_path / "a", steps=6, zero_stage=stage, gas=2)
    first = _run(tmp_path / "b", steps=6, zero_stage=stage, gas=2, train={"stop_at": 3})
    second = _run(tmp_path / "b", steps=6, zero_stage=stage, gas=2)
    assert sorted(second.losses) == [3, 4, 5]
    assert {**first.losses, **second.losses} == straight.losses  # bitwise
    a, b = load_model_state(straight.checkpoint), load_model_state(second.checkpoint)
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name


def _resume_worker(rank, world_size, job):
    try:
        train(job_config_from_dict(job), make_loader=synthetic.factory())
    except CheckpointError as exc:
        return str(exc)
    return None


@pytest.mark.distributed
def test_two_ranks_refuse_together_when_one_ranks_file_is_forged(tmp_path):
    """Only rank 1's optimiser partition is forged: rank 0 decides for everyone, so no rank is
    left waiting in a collective of a load the other rank abandoned."""
    job = synthetic.job_dict(tmp_path / "run", steps=2, zero_stage=2)
    run_distributed(_resume_worker, 2, args=(job,))
    ckpt = tmp_path / "run" / "checkpoints" / layout.step_dir_name(2)
    marker = tmp_path / "pwned"
    victim = _plant(ckpt, "zero_pp_rank_1_*optim_states.pt", marker, raw=False)
    errors = run_distributed(_resume_worker, 2, args=({**job, "train": {**job["train"], "steps": 4}},), timeout_s=120)
    assert all(e is not None and f"{victim.name}: refusing to unpickle" in e for e in errors), errors
    assert not marker.exists()
