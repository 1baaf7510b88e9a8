"""Writing exported weights: dtype cast, safetensors shards and the index transformers reads.

Native architectures go through transformers' own ``save_pretrained(max_shard_size=...)``; this
module serves the remote-code path, whose model class is not importable in the exporting process,
with the same file layout (``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json``) via huggingface_hub's splitter.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype``, contiguous and unshared (safetensors refuses shared storage)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous().clone()
            for k, v in state_dict.items()}


def save_sharded(state_dict: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str) -> list[str]:
    """Write ``state_dict`` as safetensors shards under ``out_dir``; returns the file names."""
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n] for n in names}, str(Path(out_dir) / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state_dict.values())},
                 "weight_map": split.tensor_to_filename}
        (Path(out_dir) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(split.filename_to_tensors)
