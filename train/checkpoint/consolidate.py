"""``load_model_state``: the full fp32 weights of a training checkpoint, without DeepSpeed's engine.

For export, evaluation and ``train.init_from``. Works for every ZeRO stage by using DeepSpeed's
own consolidation (``zero_to_fp32``) for stages 1-3 and the engine's module file for stage 0, so
how partitions are laid out is DeepSpeed's business, not ours. A pipeline-parallel checkpoint
(``layout.pipeline_parallel`` in its marker) is read from DeepSpeed's per-layer module files and
renamed to the model's names (train/pipeline.py): the weights the model computed with, which
in bf16 training are the bf16 copies (the fp32 masters live in the optimizer files). A
tensor-parallel one (``layout.tensor_parallel``) is read from each TP rank's module file and every
split parameter re-assembled with the families' plans (``tensor_parallel.unshard``), the same way. The returned
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


def _pipeline_state_dict(ds_dir: Path, model_config: ModelConfig, tp: int = 1) -> dict[str, torch.Tensor]:
    """The full weights from DeepSpeed's per-layer files (``layer_XX-model_states.pt``, with tensor
    parallelism one per TP rank: ``layer_XX-model_YY-model_states.pt``, re-assembled as below)."""
    from hybrid_lm.train.pipeline import state_dict_names

    splits = _tp_splits(model_config, tp) if tp > 1 else {}
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(path.name.split("-")[0][len("layer_"):]) for path in ds_dir.glob("layer_*-model_states.pt")})
    for layer in layers:
        files = sorted(ds_dir.glob(f"layer_{layer:02d}-*model_states.pt"))
        if len(files) != tp:
            raise layout.CheckpointError(f"{ds_dir}: layer {layer} has {len(files)} files, tensor_parallel={tp} needs {tp}")
        parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
        for key, tensor in parts[0].items():
            name = state_dict_names(layer, model_config.n_blocks, key)
            split = splits.get(name)
            out[name] = tensor if split is None else _unshard([part[key] for part in parts], split)
    if model_config.tie_embeddings and "embed.weight" in out:
        out["lm_head.weight"] = out["embed.weight"]  # the tied head is saved once, with the embedding
    return out


def _tp_splits(model_config: ModelConfig, tp: int) -> dict[str, Any]:
    """How the plans cut each parameter of ``model_config``'s model at ``tp`` ranks, by name (tied
    names included). Applying them to a model on the meta device (no memory, no collective: the
    group is only stored) recovers that without a process group."""
    from types import SimpleNamespace

    from hybrid_lm.models.kinds import build_lm
    from hybrid_lm.train.tensor_parallel import apply_tensor_parallel

    with torch.device("meta"):  # the model kind's own names (an HMT backbone's under backbone.)
        skeleton = apply_tensor_parallel(build_lm(model_config), SimpleNamespace(tp_size=tp, tp_rank=0, tp_group=None))
    return {name: p._tp_split for name, p in skeleton.named_parameters(remove_duplicate=False)
            if getattr(p, "_tp_split", None) is not None}


def _unshard(parts: list[torch.Tensor], split: Any) -> torch.Tensor:
    from hybrid_lm.train.tensor_parallel import unshard  # imports megatron-core: only for TP checkpoints

    return unshard(parts, split)


def _tensor_parallel_state_dict(ds_dir: Path, model_config: ModelConfig, tp: int) -> dict[str, torch.Tensor]:
    """The full weights from the module files of the ``tp`` tensor-parallel ranks (``mp_rank_XX``):
    each split parameter re-assembled by the plan that cut it, the replicated ones from rank 0."""
    files = [ds_dir / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise layout.CheckpointError(f"{ds_dir}: tensor_parallel={tp} checkpoint lacks {', '.join(missing)}")
    splits = _tp_splits(model_config, tp)
    parts = [dict(torch.load(f, map_location="cpu", weights_only=True)["module"]) for f in files]
    return {name: _unshard([part[name] for part in parts], splits[name]) if name in splits else tensor
            for name, tensor in parts[0].items()}


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
        tp = int(meta.get("layout", {}).get("tensor_parallel", 1))
        if meta.get("layout", {}).get("pipeline_parallel", 1) > 1:
            raw = _pipeline_state_dict(ckpt / DS_TAG, model_config, tp)
        elif tp > 1:
            # DeepSpeed's module files hold each TP rank's shards at every ZeRO stage TP allows
            # (0-2): the weights the model computes with, as for a pipeline (module docstring)
            raw = _tensor_parallel_state_dict(ckpt / DS_TAG, model_config, tp)
        elif int(meta.get("zero_stage", 0)) == 0:
            raw = _stage0_state_dict(ckpt / DS_TAG)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            raw = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    state_dict = {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v
                  for k, v in raw.items()}
    return LoadedModel(model_config, state_dict, ckpt, job_config, int(meta["step"]))
