"""The non-tensor training state and every RNG, as JSON and safetensors (never pickles).

Per rank: python's ``random`` state (JSON list), numpy's legacy global state (JSON), torch CPU
and CUDA generator states (uint8 tensors in safetensors), the data loader's ``state_dict()``
(JSON) and the trainer counters. Restoring RNGs is the *last* thing a resume does, after models
and loaders are built, so construction-time draws cannot shift the streams.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hybrid_lm.train.checkpoint.layout import writing


@dataclass
class TrainerState:
    """Counters that must survive a resume (global: identical on every rank)."""

    step: int = 0
    """optimizer steps taken (skipped NaN steps included: they consume data and a schedule step)"""
    tokens: int = 0
    """tokens consumed across all ranks (padding/ignored labels included)"""
    nan_skipped: int = 0
    consecutive_nan: int = 0
    spike_skipped: int = 0
    consecutive_spikes: int = 0
    loss_window: list[float] = field(default_factory=list)
    """the recent finite step losses the spike guard compares against (checkpointed with the run)"""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainerState":
        return cls(**data)


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every RNG this process uses."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    n = meta["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rank_files(ckpt: Path, rank: int) -> tuple[Path, Path]:
    return ckpt / f"rank-{rank:05d}.json", ckpt / f"rank-{rank:05d}.rng.safetensors"


def _jsonable(obj: Any, where: str) -> Any:
    """Fail at save time (not at resume) if a loader state is not plain data."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serialisable checkpoint state")


def save_rank_state(ckpt: Path, rank: int, loader_state: dict[str, Any], extra: dict[str, Any]) -> None:
    meta, tensors = capture_rng()
    json_path, rng_path = rank_files(ckpt, rank)
    payload = {"rank": rank, "rng": meta, "loader": _jsonable(loader_state, "loader"), **extra}
    with writing(json_path):
        json_path.write_text(json.dumps(payload, sort_keys=True))
    with writing(rng_path):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(rng_path))


def load_rank_state(ckpt: Path, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    json_path, rng_path = rank_files(ckpt, rank)
    return json.loads(json_path.read_text()), load_file(str(rng_path))
