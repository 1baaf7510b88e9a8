"""``load_model_state``: the full fp32 weights of a training checkpoint, without DeepSpeed's engine.

For export, evaluation and ``train.init_from``. Works for every ZeRO stage by using DeepSpeed's
own consolidation (``zero_to_fp32``) for stages 1-3 and the engine's module file for stage 0, so
how partitions are laid out is DeepSpeed's business, not ours. A pipeline-parallel checkpoint
(``layout.pipeline_parallel`` in its marker) is read from DeepSpeed's per-layer module files and
renamed to the model's names (train/pipeline.py): the weights the model computed with, which
in bf16 training are the bf16 copies (the fp32 masters live in the optimizer files). The returned
model config has no pipeline-stage marks (``|``): it describes the model, not the training layout.
The checkpoint's sha256 marker is verified first, so a corrupted file fails here with its name
rather than as a confusing shape error downstream. Every file is then read weights-only
(safe_load.py), zero_to_fp32's own ``torch.load(weights_only=False)`` included: a forged file is
refused, never executed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hybrid_lm.train.checkpoint import layout, safe_load
from hybrid_lm.train.checkpoint.manager import DS_TAG
from hybrid_lm.typed_config import from_dict

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig


@dataclass
class LoadedModel:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    """fp32, consolidated, the HybridLM's own parameter names (tied weights under both names)"""
    tokenizer_dir: Path
    """directory holding tokenizer.json (the checkpoint dir itself)"""
    job_config: dict[str, Any]
    """the resolved JobConfig the run was started with (plain data)"""
    step: int


def _stage0_state_dict(ds_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise layout.CheckpointError(f"{ds_dir}: no mp_rank_*_model_states.pt")
    # weights_only: the module file also holds DeepSpeed's bookkeeping; only plain containers,
    # strings and tensors are accepted, nothing gets unpickled into live objects.
    blob = torch.load(files[0], map_location="cpu", weights_only=True)
    return dict(blob["module"])


def _pipeline_state_dict(ds_dir: Path, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    from hybrid_lm.train.pipeline import state_dict_names

    out: dict[str, torch.Tensor] = {}
    for path in sorted(ds_dir.glob("layer_*-model_states.pt")):
        layer = int(path.name.split("-")[0][len("layer_"):])
        for key, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            out[state_dict_names(layer, model_config.n_blocks, key)] = tensor
    if model_config.tie_embeddings and "embed.weight" in out:
        out["lm_head.weight"] = out["embed.weight"]  # the tied head is saved once, with the embedding
    return out


def load_model_state(path: Path) -> LoadedModel:
    """Weights and configs of a run dir (its newest complete checkpoint) or a checkpoint dir."""
    from hybrid_lm.models.config import ModelConfig

    ckpt = layout.resolve_checkpoint(Path(path))
    meta = layout.verify(ckpt)
    job_config = json.loads((ckpt / "config.json").read_text())
    model_config = from_dict(ModelConfig, job_config["model"], "model")
    model_config = dataclasses.replace(model_config, layer_pattern=model_config.block_pattern)
    safe_load.check(ckpt / DS_TAG)
    with safe_load.weights_only_loads(ckpt / DS_TAG):
        if meta.get("layout", {}).get("pipeline_parallel", 1) > 1:
            raw = _pipeline_state_dict(ckpt / DS_TAG, model_config)
        elif int(meta.get("zero_stage", 0)) == 0:
            raw = _stage0_state_dict(ckpt / DS_TAG)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            raw = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    state_dict = {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v
                  for k, v in raw.items()}
    return LoadedModel(model_config, state_dict, ckpt, job_config, int(meta["step"]))
