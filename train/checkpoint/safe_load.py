"""Weights-only unpickling for DeepSpeed's checkpoint files: loading never unpickles arbitrary
objects, since a checkpoint may come from someone else and a pickle can run any code.

DeepSpeed reads its own ``ds/*.pt`` files with ``torch.load(weights_only=False)``, both in
``engine.load_checkpoint`` (TorchCheckpointEngine) and in ``zero_to_fp32`` (which
``load_model_state`` uses for ZeRO 1-3). A pickle can run any code while it is read, and our
sha256 marker proves only that the files are the ones the marker lists, not who wrote them. So
every DeepSpeed load we run happens inside ``weights_only_loads()``, which

- sets ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``: ``torch.load`` reads it on every call and it overrides
  an explicit ``weights_only=False``, so one mechanism covers the engine and zero_to_fp32 without
  patching either (a checkpoint-engine subclass would miss zero_to_fp32's direct ``torch.load``);
- allowlists the three DeepSpeed classes its checkpoints actually contain, nothing else
  (found by saving ZeRO 0/1/2/3, fp32 and bf16, 1 and 2 ranks, and asking
  ``torch.serialization.get_unsafe_globals_in_checkpoint``; the test suite re-checks the set).

``scan()`` reads the same files statically (pickle opcodes only, nothing is constructed) so a
refusal names the file before DeepSpeed starts, and rank 0 can decide for every rank. The
weights-only unpickler resolves globals only through the GLOBAL opcode, which the scan sees, so
the scan and the load agree; the load is still the guarantee if they ever do not.

The allowlist, and why each entry cannot run code when unpickled: the weights-only unpickler
only calls ``cls(*args)`` (REDUCE) or ``cls.__new__(cls)`` (NEWOBJ) on allowlisted classes and
then sets attributes from plain data (BUILD, no ``__setstate__`` on any of them); the attribute
values are themselves restricted to tensors, containers and primitives.

- ``deepspeed.runtime.zero.config.ZeroStageEnum``: an ``int`` Enum (the saved ZeRO stage);
  calling it only looks up a member and raises on an unknown value.
- ``deepspeed.runtime.fp16.loss_scaler.LossScaler``: the static loss scaler ZeRO saves even in
  fp32/bf16; ``__init__`` stores ``cur_scale`` and ``dynamic`` and nothing else, no properties
  with side effects are touched by attribute assignment.
- ``deepspeed.utils.tensor_fragment.fragment_address``: a plain two-int dataclass
  (``numel``, ``start``) describing where a parameter sits in a flat ZeRO partition.

Not on the list on purpose: ``DynamicLossScaler`` (fp16 only; we train fp32/bf16) and anything a
future DeepSpeed starts pickling; such a checkpoint is refused with the class named, and the
entry is added here after reading that class.

The environment variable is process-wide: while a load is in progress, ``torch.load`` in other
threads is weights-only too (stricter, never looser). Scopes are serialised by a lock and nest.
"""
from __future__ import annotations

import os
import pickle
import re
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch

from hybrid_lm.train.checkpoint.layout import CheckpointError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
NO_FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_WHY = (f"loading never runs code from checkpoint files; if a DeepSpeed upgrade wrote "
        f"this file, review the class and add it to the allowlist in {__name__}")

_lock = threading.RLock()
_depth = 0
_active: ExitStack | None = None


def allowlist() -> list[type]:
    """The non-torch classes DeepSpeed's checkpoints contain (see the module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextmanager
def _allowlisted() -> Iterator[None]:
    # safe_globals' exit removes what it added even if it was allowlisted before; add only what is missing
    present = set(torch.serialization.get_safe_globals())
    with torch.serialization.safe_globals([c for c in allowlist() if c not in present]):
        yield


def _scan_file(path: Path) -> str | None:
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # not a zip archive: a bare pickle stream, or torch's legacy format
        return (f"{path}: refusing to unpickle it: not a torch.save zip archive (DeepSpeed writes "
                f"those); {_WHY}")
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError) as exc:
        return f"{path}: refusing to unpickle it: {type(exc).__name__}: {exc}; {_WHY}"
    if unsafe:
        return f"{path}: refusing to unpickle {', '.join(sorted(unsafe))}: not on the allowlist; {_WHY}"
    return None


def scan(ds_dir: Path) -> list[str]:
    """One message per ``*.pt`` file under ``ds_dir`` that a weights-only load would refuse."""
    with _allowlisted():
        found = (_scan_file(p) for p in sorted(Path(ds_dir).glob("*.pt")))
        return [msg for msg in found if msg is not None]


def check(ds_dir: Path) -> None:
    """CheckpointError naming every refused file, before anything is loaded."""
    problems = scan(ds_dir)
    if problems:
        raise CheckpointError("; ".join(problems))


def _refusal(where: Path, exc: BaseException) -> str:
    named = scan(where)
    if named:
        return "; ".join(named)
    # torch's message wraps the reason in advice to pass weights_only=False; keep only the reason
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reasons = [ln for ln in lines if not ln.startswith(boilerplate)] or lines[:1]
    detail = re.sub(r"^WeightsUnpickler error: | Please use `torch\.serialization.*$", "", reasons[0])
    return f"{where}: refusing to unpickle a DeepSpeed file: {detail}; {_WHY}"


def _enter() -> ExitStack:
    stack = ExitStack()
    saved = {name: os.environ.get(name) for name in (FORCE_ENV, NO_FORCE_ENV)}

    def restore_env() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    stack.callback(restore_env)
    os.environ[FORCE_ENV] = "1"
    os.environ.pop(NO_FORCE_ENV, None)  # torch refuses to load at all when both are set
    stack.enter_context(_allowlisted())
    return stack


@contextmanager
def weights_only_loads(where: Path) -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only with the DeepSpeed allowlist; a refused file
    surfaces as CheckpointError naming it (``where``: the directory the loads read from)."""
    global _depth, _active
    with _lock:
        if _depth == 0:
            _active = _enter()
        _depth += 1
        try:
            yield
        except pickle.UnpicklingError as exc:
            raise CheckpointError(_refusal(Path(where), exc)) from exc
        finally:
            _depth -= 1
            if _depth == 0 and _active is not None:
                _active.close()
                _active = None
