"""Save and restore a whole training run: the engine's files for model and optimiser, ours for the rest.

``save(...)`` is collective (every rank calls it) and atomic: write into
``step-XXXXXXX.tmp/``, barrier, rank 0 renames it to ``step-XXXXXXX/``, writes ``COMPLETE.json``
(sha256 of every file) and only then moves ``latest`` and purges old checkpoints. A crash at any
point leaves either the previous state or a directory that never counts.

``restore(...)`` picks the newest checkpoint that verifies (rank 0 decides, everyone follows),
refuses a changed tokenizer with a message that says so, and loads the model and optimiser
through the engine; a checkpoint of another world size or parallel layout is resharded
(checkpoint/reshard.py: weights, AdamW state, loader cursors carried over) or refused saying why (train/engine.py; the DeepSpeed engines load every ZeRO
stage). DeepSpeed's own files are read by DeepSpeed (``torch.load``) only *after* their sha256
matched the marker we wrote, and only weights-only with a minimal allowlist (safe_load.py): the
marker proves integrity, not origin.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from hybrid_lm.train import distributed as D
from hybrid_lm.train.checkpoint import layout
from hybrid_lm.train.checkpoint.state import TrainerState, load_rank_state, restore_rng, save_rank_state

if TYPE_CHECKING:
    from hybrid_lm.train.engine import Engine

#: the DeepSpeed engines write their files into <checkpoint>/ds/ (DeepSpeed's "tag")
DS_TAG = "ds"


@dataclass
class CheckpointConfig:
    every: int = 100
    """save every N optimizer steps (0: only at the end and on SIGTERM/SIGUSR1)"""
    keep: int = 2
    """complete checkpoints to keep (the newest complete one is never deleted)"""
    dir: Optional[str] = None
    """where checkpoints go; None means <train.run_dir>/checkpoints"""
    allow_tokenizer_change: bool = False
    """resume even though the data's tokenizer.json differs from the checkpoint's"""

    def validate(self) -> None:
        from hybrid_lm.typed_config import require_at_least

        require_at_least(self, 0, "every")
        require_at_least(self, 1, "keep")  # the purge keeps the newest complete one whatever keep says


def _versions() -> dict[str, str]:
    import deepspeed

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()}


def save(engine: Engine, root: Path, state: TrainerState, *, rank: int, world_size: int, loader_state: dict[str, Any],
         job_config: dict[str, Any], tokenizer_file: Optional[Path], keep: int, zero_stage: int) -> Path:
    """Write a complete checkpoint of ``state.step`` under ``root``; returns its final path.

    A write that fails on any rank (full disk, quota, I/O error) raises CheckpointWriteError on every
    rank, naming the file and the cause, once the partial directory is removed (it would keep the
    space it took); the previous complete checkpoint and ``latest`` stay as they were.
    """
    root = Path(root)
    final = root / layout.step_dir_name(state.step)
    tmp = final.with_name(final.name + ".tmp")
    failure: Optional[str] = None
    if rank == 0:
        try:
            with layout.writing(tmp):
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crashed save of the same step
                tmp.mkdir()
        except layout.CheckpointWriteError as exc:
            failure = str(exc)
    _check_written(failure, engine.device, root, state.step, tmp, rank)
    try:
        with layout.writing(tmp):
            engine.save(tmp)
            from hybrid_lm.train.checkpoint import reshard

            save_rank_state(tmp, rank, loader_state, {"world_size": world_size, "step": state.step,
                                                      "shards": reshard.describe(engine)})
            if rank == 0:
                with layout.writing(tmp / "trainer.json"):
                    (tmp / "trainer.json").write_text(json.dumps(state.to_json(), sort_keys=True))
                with layout.writing(tmp / "config.json"):
                    (tmp / "config.json").write_text(json.dumps(job_config, indent=1, sort_keys=True))
                if tokenizer_file is not None and tokenizer_file.is_file():
                    with layout.writing(tmp / "tokenizer.json"):
                        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    except layout.CheckpointWriteError as exc:
        failure = str(exc)
    _check_written(failure, engine.device, root, state.step, tmp, rank)
    if rank == 0:
        meta = {"step": state.step, "world_size": world_size, "zero_stage": zero_stage, "tokens": state.tokens,
                "versions": _versions()}
        if engine.checkpoint_layout:
            meta["layout"] = engine.checkpoint_layout
        try:
            _finalize(root, final, tmp, meta, keep)
        except layout.CheckpointWriteError as exc:
            failure = str(exc)
    _check_written(failure, engine.device, root, state.step, tmp, rank)
    return final


def _finalize(root: Path, final: Path, tmp: Path, meta: dict[str, Any], keep: int) -> None:
    """Rank 0: rename, marker, ``latest``, purge. Until the marker exists a save of the same step
    that ``final`` replaces stays on disk, and it is put back if the new one cannot be completed."""
    old = final.with_name(final.name + ".replaced.tmp")
    try:
        with layout.writing(final):
            if final.exists():  # re-saving a step (a resume=never run in an old run dir): swap, then delete
                final.rename(old)
            tmp.rename(final)
            layout.fsync_dir(root)
        with layout.writing(final / layout.MARKER):
            layout.write_marker(final, meta)
    except layout.CheckpointWriteError:
        if old.exists():
            shutil.rmtree(final, ignore_errors=True)
            old.rename(final)
        elif not (final / layout.MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    try:
        with layout.writing(root / layout.LATEST):
            layout.update_latest(root, final)
    except layout.CheckpointWriteError as exc:
        # the checkpoint is complete and resume finds it by scanning the step dirs, not through `latest`
        print(f"[checkpoint] warning: {exc}; {final.name} is complete but {layout.LATEST} still names an older one",
              file=sys.stderr, flush=True)
    layout.purge(root, keep)


def _check_written(failure: Optional[str], device: torch.device, root: Path, step: int, tmp: Path, rank: int) -> None:
    """Collective, in place of a barrier: when a write failed on any rank, every rank raises."""
    (failed,) = D.all_reduce_sum([float(failure is not None)], device)
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # every rank has stopped writing into it
    latest = root / layout.LATEST
    previous = latest.read_text().strip() if latest.is_file() else "none"
    raise layout.CheckpointWriteError(
        f"checkpoint step {step} not saved: {failure or 'another rank could not write its files (its error names them)'}; "
        f"nothing was marked complete, the newest complete checkpoint is still {previous}. Fix the cause (free "
        "space) and resume: train.resume=auto continues from it.")


def _auto_resume(root: Path) -> Optional[Path]:
    found, failures = layout.newest_complete_and_failures(root)
    # a dir without a marker is a save that never finished; one whose marker no longer matches
    # its files held progress that starting over at step 0 would overwrite
    corrupt = [exc for path, exc in failures if (path / layout.MARKER).is_file()]
    if found is None and corrupt:
        raise layout.CheckpointError(
            f"train.resume=auto: every checkpoint in {root} fails verification ({'; '.join(map(str, corrupt))}); "
            "refusing to start from step 0 over them. Repair them or move them out of the way, or set "
            "train.resume=never to start from step 0 anyway (the new run replaces each one when it reaches its step).")
    return found


def find_resume(resume: str, root: Path) -> Optional[Path]:
    """The checkpoint to resume from: ``never`` -> None, ``auto`` -> newest complete under root
    (None when there is none; CheckpointError when there are checkpoints and every one is corrupt),
    anything else is a path (run dir or checkpoint dir). Collective: rank 0 decides, every rank
    returns the same path or raises the same error."""
    if resume == "never":
        return None
    chosen: Optional[str] = None
    error: Optional[str] = None
    if D.is_main():
        try:
            found = _auto_resume(Path(root)) if resume == "auto" else layout.resolve_checkpoint(Path(resume))
            chosen = None if found is None else str(found)
        except layout.CheckpointError as exc:
            error = str(exc)
    chosen, error = D.broadcast_object((chosen, error))  # type: ignore[misc]
    if error is not None:
        raise layout.CheckpointError(error)
    return None if chosen is None else Path(chosen)


def restore(engine: Engine, ckpt: Path, *, rank: int, world_size: int, tokenizer_file: Optional[Path],
            allow_tokenizer_change: bool) -> tuple[TrainerState, dict[str, Any], tuple[dict, dict]]:
    """Load model/optimiser into ``engine``; returns (trainer state, this rank's loader state,
    this rank's RNG state to hand to ``restore_rng`` once everything else is built)."""
    meta = json.loads((ckpt / layout.MARKER).read_text())
    saved_layout = meta.get("layout", {})
    same = saved_layout == engine.checkpoint_layout and meta["world_size"] == world_size
    saved_tok = ckpt / "tokenizer.json"
    if (not allow_tokenizer_change and saved_tok.is_file() and tokenizer_file is not None
            and tokenizer_file.is_file() and layout.sha256_file(saved_tok) != layout.sha256_file(tokenizer_file)):
        raise layout.CheckpointError(
            f"{tokenizer_file} differs from the tokenizer saved in {ckpt}; refusing to resume on different "
            "tokens (set checkpoint.allow_tokenizer_change=true to override)")
    state = TrainerState.from_json(json.loads((ckpt / "trainer.json").read_text()))
    if same:
        engine.load(ckpt)
        rank_meta, rng_tensors = load_rank_state(ckpt, rank)
        return state, rank_meta["loader"], (rank_meta["rng"], rng_tensors)
    return state, *_restore_resharded(engine, ckpt, meta, rank=rank)


def _describe_layout(found: dict[str, Any], world_size: int) -> str:
    return ", ".join([f"world_size={world_size}", *(f"{k}={v}" for k, v in sorted(found.items()))])


def _restore_resharded(engine: Engine, ckpt: Path, meta: dict[str, Any], *, rank: int) -> tuple[Any, tuple[dict, dict]]:
    """Load a checkpoint of another layout (checkpoint/reshard.py); returns (this rank's loader
    state, or every old data rank's when the data-parallel size changed; an RNG state)."""
    from hybrid_lm.train.checkpoint import reshard

    old_world = int(meta["world_size"])
    try:
        # context parallelism replicates the weights over its ranks: a change of its size is a change
        # of the data layout only, which the reshard (weights, moments, loader cursors) covers
        reshard.load(engine, ckpt, saved_world_size=old_world)
    except layout.CheckpointError as exc:
        now = _describe_layout(engine.checkpoint_layout, D.dist.get_world_size())
        raise layout.CheckpointError(f"{exc} (saved with {_describe_layout(meta.get('layout', {}), old_world)}, "
                                     f"now {now}; train.init_from takes only the weights)") from exc
    metas = [load_rank_state(ckpt, r)[0] for r in range(old_world)]
    loaders: dict[int, Any] = {}
    for m in metas:
        loaders.setdefault(m["shards"]["data_rank"], m["loader"])
    old_data = metas[0]["shards"]["data_size"]
    loader = loaders[engine.data_rank] if old_data == engine.data_size else [loaders[d] for d in range(old_data)]
    # no rank of the old layout is this one; every rank's RNG streams were seeded alike
    rng_meta, rng_tensors = load_rank_state(ckpt, rank % old_world)
    if D.is_main():
        print(f"[checkpoint] resharded {ckpt.name}: saved with {_describe_layout(meta.get('layout', {}), old_world)}, "
              f"now {_describe_layout(engine.checkpoint_layout, D.dist.get_world_size())}", flush=True)
    return loader, (rng_meta["rng"], rng_tensors)


def loader_state(loader: Any, saved: Any) -> Any:
    """What ``loader.load_state_dict`` takes from ``restore``'s loader state (see reshard.loader_state)."""
    from hybrid_lm.train.checkpoint import reshard

    return reshard.loader_state(loader, saved)


def apply_rng(rng: tuple[dict, dict]) -> None:
    restore_rng(*rng)
