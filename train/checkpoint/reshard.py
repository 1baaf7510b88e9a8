"""Resume on another parallel layout: a checkpoint saved at one (tensor, pipeline, data) parallel
layout loaded into an engine of another, model weights and AdamW state carried over.

    TP=2 (2 ranks)  ->  TP=1 (1 rank)          PP=2 -> TP=2          DP=2 -> DP=1 x TP=2 ...

How: our own consolidation to a layout-free form, then a re-split with the families' TP plans.
Each rank records at save time (``describe``, in its ``rank-XXXXX.json``) where it sits (data,
tensor rank), the DeepSpeed file holding its optimizer state, and its optimizer's parameters in
order: ``HybridLM`` name, the ``Split`` that cut it, DeepSpeed's name, its local shape. A resume
on another layout (``load``) rebuilds from that, on every rank: the full weights (``consolidate``,
as export does) and the full AdamW moments of every parameter: at ZeRO-0 from the torch
optimizer's state dict in DeepSpeed's module file; at ZeRO 1-2 from every data rank's flat
partition, cut at the fragments DeepSpeed's ``param_slice_mappings`` list (a parameter's
fragments in data-rank order are the parameter); then each saving TP rank's pieces joined with
``tensor_parallel.unshard`` (a tied weight held by two stages taken once). Each new rank then cuts
its own pieces with its plans (``tensor_parallel.shard``) and loads them: at ZeRO-0 as the torch
optimizer's state dict, at ZeRO 1-2 into DeepSpeed's fp32 partitions and their AdamW state through
its per-parameter fragment map (``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``).
AdamW's step count, the trainer counters and the LR (a pure function of the step) carry over as
they are; the data loaders' cursors are remapped by the loader (``loader_state``).

Why not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal_checkpoint``):
it describes TP slicing in Megatron-DeepSpeed's patterns, while our TP plans cut fused projections
per component (``Split.sizes``, Mamba-2's z/x/B/C/dt), which those patterns cannot say, and at
ZeRO-0 DeepSpeed keeps a plain torch AdamW whose state no universal loader reads. The plans that
cut the model are the one source of truth for re-assembling it; from DeepSpeed only its own
fragment maps are used, read and written through its public helpers.

Limits (refused with a message naming them): fp32 only (bf16 keeps its fp32 masters in its own
optimizer), ZeRO 0-2 (ZeRO-3 partitions the parameters themselves); the
whole model's weights and moments are assembled on every rank (host memory for 3x the fp32
model); a data-parallel size change needs a loader that can remap its cursors
(``remap_state_dicts``).

Context parallelism: its ranks hold the same weights, so a change of its size (or to or from none)
changes only the data layout. Under ZeRO 1-2 the partitions run over data x context (DeepSpeed's
data-parallel group through ``DeepSpeedMPU``), whose rank order is the global one, as the stable
sort by ``data_rank`` of the rank records (in global order) leaves them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from hybrid_lm.train.checkpoint import layout, safe_load
from hybrid_lm.train.checkpoint.manager import DS_TAG
from hybrid_lm.train.checkpoint.state import rank_files

#: AdamW's per-parameter tensors that have the parameter's shape (``step`` is a scalar)
MOMENTS = ("exp_avg", "exp_avg_sq")


def _tp_group(engine: Any) -> Any:
    return getattr(engine, "_tp_group", None)


def _named_parameters(engine: Any) -> list[tuple[str, nn.Parameter]]:
    """The engine's trainable parameters under ``HybridLM``'s names."""
    own = getattr(engine, "hybrid_parameters", None)
    if own is not None:
        return own()
    return list(engine.module.named_parameters())


def _optimizer_params(engine: Any) -> list[list[nn.Parameter]]:
    """The model parameters the optimizer updates, by group, in its order (under ZeRO 1-2 DeepSpeed
    swaps the optimizer's own groups for flat partitions; its ``bit16_groups`` keep the order)."""
    ds = engine._ds
    if ds.zero_optimization_stage():
        return [list(group) for group in ds.optimizer.bit16_groups]
    return [list(group["params"]) for group in engine.optimizer.param_groups]


def supported(engine: Any) -> Optional[str]:
    """None when ``engine``'s state can be resharded, else why not."""
    ds = getattr(engine, "_ds", None)
    if ds is None:
        return "the engine keeps no DeepSpeed state"
    if ds.zero_optimization_stage() > 2:
        return f"parallel.zero_stage={ds.zero_optimization_stage()} (resharding needs zero_stage 0-2)"
    if ds.bfloat16_enabled() or ds.fp16_enabled():
        return "bf16/fp16 training (resharding needs fp32)"
    return None


def describe(engine: Any) -> dict[str, Any]:
    """What a later resume on another layout needs to know about this rank (plain JSON)."""
    why_not = supported(engine)
    if why_not is not None:
        return {"unsupported": why_not}
    group = _tp_group(engine)
    names = {id(p): name for name, p in _named_parameters(engine)}
    ds = engine._ds
    params = []
    for group_params in _optimizer_params(engine):
        for p in group_params:
            split = getattr(p, "_tp_split", None)
            # [the model's name, the plan's cut, DeepSpeed's name (its ZeRO slice maps use it), this rank's shape]
            params.append([names[id(p)], None if split is None else [split.dim, list(split.sizes)],
                           ds.param_names.get(p, names[id(p)]), list(p.shape)])
    zero = ds.zero_optimization_stage()
    return {"data_rank": engine.data_rank, "data_size": engine.data_size,
            "tp_rank": 0 if group is None else dist.get_rank(group),
            "tp_size": 1 if group is None else dist.get_world_size(group), "zero_stage": zero,
            "optimizer_file": Path(ds._get_zero_ckpt_name("", DS_TAG) if zero else ds._get_ckpt_name("", DS_TAG)).name,
            "params": params}


def _saved_shards(ckpt: Path, world_size: int) -> list[dict[str, Any]]:
    out = []
    for rank in range(world_size):
        meta = json.loads(rank_files(ckpt, rank)[0].read_text())
        shards = meta.get("shards")
        if shards is None:
            raise layout.CheckpointError(f"{ckpt}: saved before resharding was supported (no layout in "
                                         f"{rank_files(ckpt, rank)[0].name}); resume with the same layout")
        if "unsupported" in shards:
            raise layout.CheckpointError(f"{ckpt}: cannot be resharded: saved with {shards['unsupported']}; "
                                         "resume with the same layout")
        out.append(shards)
    return out


def _full_moments(ckpt: Path, saved: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's AdamW state at its full shape, by ``HybridLM`` name."""
    from hybrid_lm.models.common.tp_plan import Split
    from hybrid_lm.train.tensor_parallel import unshard

    pieces: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    splits: dict[str, Any] = {}
    tp_size = {}
    seen_files = set()
    ds_dir = ckpt / DS_TAG
    safe_load.check(ds_dir)
    with safe_load.weights_only_loads(ds_dir):
        for shards in saved:
            if shards["data_rank"] != 0 or shards["optimizer_file"] in seen_files:
                continue  # data-parallel replicas hold the same state
            seen_files.add(shards["optimizer_file"])
            if shards.get("zero_stage", 0):
                _zero_pieces(ds_dir, saved, shards, pieces, splits, tp_size)
                continue
            blob = torch.load(ds_dir / shards["optimizer_file"], map_location="cpu", weights_only=True)
            opt = blob.get("optimizer")
            if not isinstance(opt, dict) or "state" not in opt:
                raise layout.CheckpointError(f"{ds_dir / shards['optimizer_file']}: no optimizer state to reshard")
            indices = [i for g in opt["param_groups"] for i in g["params"]]
            if len(indices) != len(shards["params"]):
                raise layout.CheckpointError(f"{ds_dir / shards['optimizer_file']}: {len(indices)} optimizer "
                                             f"parameters, the rank's record lists {len(shards['params'])}")
            for index, (name, split, *_) in zip(indices, shards["params"]):
                # a tied weight held by two stages: both copies saw the same summed gradients
                pieces.setdefault(name, {}).setdefault(shards["tp_rank"], opt["state"].get(index, {}))
                splits[name] = None if split is None else Split(split[0], tuple(split[1]))
                tp_size[name] = shards["tp_size"]
    full: dict[str, dict[str, torch.Tensor]] = {}
    for name, by_rank in pieces.items():
        if splits[name] is not None and sorted(by_rank) != list(range(tp_size[name])):
            raise layout.CheckpointError(f"{ckpt}: optimizer state of {name} lacks tensor-parallel ranks "
                                         f"(has {sorted(by_rank)} of {tp_size[name]})")
        first = by_rank[min(by_rank)]
        if not first:
            full[name] = {}  # never stepped
            continue
        state = {"step": first["step"]}
        for key in MOMENTS:
            state[key] = (first[key] if splits[name] is None
                          else unshard([by_rank[r][key] for r in range(tp_size[name])], splits[name]))
        full[name] = state
    return full


def _zero_pieces(ds_dir: Path, saved: list[dict[str, Any]], first: dict[str, Any],
                 pieces: dict[str, dict[int, dict[str, torch.Tensor]]], splits: dict[str, Any],
                 tp_size: dict[str, int]) -> None:
    """The AdamW state of one (tensor, pipeline) rank's parameters from its ZeRO 1-2 partitions:
    every data rank's file holds a flat slice of each group, and DeepSpeed's ``param_slice_mappings``
    say where each parameter's fragment sits in it; a parameter's fragments in data-rank order are
    the parameter, flattened."""
    from hybrid_lm.models.common.tp_plan import Split

    suffix = "_mp_rank_" + first["optimizer_file"].split("_mp_rank_")[1]
    replicas = sorted((s for s in saved if s["optimizer_file"].endswith(suffix)), key=lambda s: s["data_rank"])
    fragments: dict[tuple[str, str], list[torch.Tensor]] = {}
    step = None
    for shards in replicas:
        state = torch.load(ds_dir / shards["optimizer_file"], map_location="cpu", weights_only=True)["optimizer_state_dict"]
        base = state["base_optimizer_state"]
        group_states = base if isinstance(base, list) else [base["state"][i] for i in sorted(base["state"])]
        for group, mapping in zip(group_states, state["param_slice_mappings"]):
            if not group:
                continue  # never stepped
            step = group["step"]
            for ds_name, address in mapping.items():
                for key in MOMENTS:
                    fragments.setdefault((ds_name, key), []).append(group[key].narrow(0, address.start, address.numel))
    for name, split, ds_name, shape in first["params"]:
        stepped = (ds_name, MOMENTS[0]) in fragments
        pieces.setdefault(name, {}).setdefault(first["tp_rank"], {} if not stepped else {
            "step": step, **{key: torch.cat(fragments[ds_name, key]).view(shape) for key in MOMENTS}})
        splits[name] = None if split is None else Split(split[0], tuple(split[1]))
        tp_size[name] = first["tp_size"]


def load(engine: Any, ckpt: Path, *, saved_world_size: int) -> None:
    """Load ``ckpt`` (saved at another layout) into ``engine``: weights and AdamW state. Collective
    only in that every rank calls it; each reads the files itself."""
    from hybrid_lm.train.checkpoint.consolidate import load_model_state
    from hybrid_lm.train.tensor_parallel import shard

    why_not = supported(engine)
    if why_not is not None:
        raise layout.CheckpointError(f"{ckpt}: resuming on another layout is not supported with {why_not}")
    saved = _saved_shards(ckpt, saved_world_size)
    weights = load_model_state(ckpt).state_dict
    moments = _full_moments(ckpt, saved)
    group = _tp_group(engine)
    rank, size = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))

    def mine(name: str, p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        split = getattr(p, "_tp_split", None)
        piece = full if split is None else shard(full, split, rank, size)
        if piece.shape != p.shape:
            raise layout.CheckpointError(f"{ckpt}: {name} has shape {tuple(full.shape)}, which this layout "
                                         f"cannot cut into this rank's {tuple(p.shape)}")
        return piece.to(device=p.device, dtype=p.dtype)

    names = {id(p): name for name, p in _named_parameters(engine)}
    groups = _optimizer_params(engine)
    for p in (p for group_params in groups for p in group_params):
        if names[id(p)] not in weights or names[id(p)] not in moments:
            raise layout.CheckpointError(f"{ckpt}: holds no {names[id(p)]} (another model?)")
    with torch.no_grad():
        if engine._ds.zero_optimization_stage():
            _load_zero(engine, groups, names, weights, moments, mine)
        else:
            _load_plain(engine.optimizer, groups, names, weights, moments, mine)
    steps = json.loads((ckpt / layout.MARKER).read_text())["step"]
    engine._ds.global_steps = steps  # DeepSpeed's own counter, as a same-layout load restores it


def _load_plain(optimizer: Any, groups: list[list[nn.Parameter]], names: dict[int, str], weights: dict[str, Any],
                moments: dict[str, dict[str, Any]], mine: Any) -> None:
    """ZeRO-0: the weights into the parameters, the moments as the torch optimizer's own state dict."""
    state_dict = optimizer.state_dict()
    new_state: dict[int, dict[str, Any]] = {}
    index = 0
    for group_params in groups:
        for p in group_params:
            name = names[id(p)]
            p.copy_(mine(name, p, weights[name]))
            if moments[name]:
                new_state[index] = {"step": moments[name]["step"].clone(),
                                    **{k: mine(name, p, moments[name][k]) for k in MOMENTS}}
            index += 1
    state_dict["state"] = new_state
    optimizer.load_state_dict(state_dict)


def _load_zero(engine: Any, groups: list[list[nn.Parameter]], names: dict[int, str], weights: dict[str, Any],
               moments: dict[str, dict[str, Any]], mine: Any) -> None:
    """ZeRO 1-2: the weights into the parameters and DeepSpeed's fp32 partitions, the moments into
    the optimizer state of those partitions, each through DeepSpeed's per-parameter fragment map
    (``safe_set_full_*``: a rank writes the part of a parameter its partition holds)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = engine._ds.optimizer
    steps = [m["step"] for m in moments.values() if m]
    if steps:
        for flat in zero.single_partition_of_fp32_groups:
            zero.optimizer.state[flat] = {"step": steps[0].clone(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for group_params in groups:
        for p in group_params:
            name = names[id(p)]
            value = mine(name, p, weights[name])
            p.copy_(value)
            safe_set_full_fp32_param(p, value)
            if moments[name]:
                for key in MOMENTS:
                    safe_set_full_optimizer_state(p, mine(name, p, moments[name][key]), key)


def loader_state(loader: Any, saved: Any) -> Any:
    """The state for ``loader`` from what ``manager.restore`` returned: one state dict (same
    data-parallel size: the saved one of this data rank) or, after a data-parallel size change,
    the list of every old data rank's state, which only a loader with ``remap_state_dicts`` can
    turn into its own."""
    if not isinstance(saved, list):
        return saved
    remap = getattr(loader, "remap_state_dicts", None)
    if remap is None:
        raise layout.CheckpointError(
            f"the checkpoint was saved with {len(saved)} data-parallel ranks; {type(loader).__name__} cannot "
            "remap its cursors to another data-parallel size. Resume with the same data-parallel size "
            "(world size / (tensor_parallel x context_parallel x pipeline_parallel)).")
    return remap(saved)
