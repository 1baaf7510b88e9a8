"""The layer pattern as pipeline stages: where the stack is cut, and the pieces DeepSpeed runs.

    parallel.pipeline_parallel=2 model.layer_pattern="M-A-|M-A-"   # cut where the pattern says
    parallel.pipeline_parallel=2 model.layer_pattern="M-A-M-A-"    # cut balanced by FLOPs per token

The model (``HybridLM``) is built whole, seeded as in a one-process run, and handed over here as a
list of layers for DeepSpeed's ``PipelineModule``: the embedding, one layer per block, the final
norm, the LM head. Each layer passes ``(x, doc_ids, position_ids)`` to the next, so document
boundaries and positions travel with the activations between stages (they are integer tensors:
DeepSpeed sends them along and expects no gradient for them). The LM head tied to the embedding
is one DeepSpeed ``TiedLayerSpec`` on the first and last stage, whose gradients DeepSpeed sums
between the two; untied, it is a plain layer of the last stage.

A split is contiguous blocks per stage, at least one block each; the embedding goes with the first
stage, the final norm and head with the last. Without ``|`` the split minimises the largest
stage's forward FLOPs per token (each layer's ``flops_per_token(seq_len)``, the head's 2·d·V):
backward costs a fixed multiple of forward for every layer, so the same split balances both.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.models.config import STAGE_MARK, ModelConfig
from hybrid_lm.models.hybrid import Block, HybridLM
from hybrid_lm.typed_config import ConfigError

#: a stage's share of the blocks: block indices [start, stop)
Bounds = list[tuple[int, int]]
#: what one pipeline layer hands the next: (B, T, D) activations, (B, T) doc ids, (B, T) positions
Carried = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_pipeline(model: ModelConfig, stages: int) -> None:
    """ConfigError when ``model.layer_pattern`` cannot make ``stages`` stages (run at config load)."""
    if stages == 1:
        return
    marked = model.layer_pattern.count(STAGE_MARK) + 1
    if STAGE_MARK in model.layer_pattern and marked != stages:
        raise ConfigError(f"model.layer_pattern: {model.layer_pattern!r} marks {marked} pipeline stages with "
                          f"'{STAGE_MARK}', but parallel.pipeline_parallel={stages}")
    if model.n_blocks < stages:
        raise ConfigError(f"parallel.pipeline_parallel: {stages} stages need at least {stages} blocks; "
                          f"model.layer_pattern {model.layer_pattern!r} has {model.n_blocks}")


def marked_bounds(pattern: str) -> Optional[Bounds]:
    """The stages ``|`` marks in ``pattern`` (None without marks)."""
    if STAGE_MARK not in pattern:
        return None
    bounds, start = [], 0
    for part in pattern.split(STAGE_MARK):
        bounds.append((start, start + len(part)))
        start += len(part)
    return bounds


def balanced_bounds(block_costs: Sequence[float], stages: int, *, first_extra: float = 0.0,
                    last_extra: float = 0.0) -> Bounds:
    """Contiguous stages of at least one block each minimising the largest stage cost (the first
    stage also pays ``first_extra``, the last ``last_extra``); ties go to the earliest cut."""
    n = len(block_costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} blocks into {stages} stages of at least one block")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, start: int, stop: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == stages - 1 else 0.0)
        return prefix[stop] - prefix[start] + extra

    @lru_cache(maxsize=None)
    def best(stage: int, start: int) -> tuple[float, tuple[int, ...]]:
        """(largest stage cost, cut positions) for blocks [start, n) over stages stage..stages-1."""
        if stage == stages - 1:
            return cost(stage, start, n), ()
        options = []
        for stop in range(start + 1, n - (stages - stage - 1) + 1):
            rest, cuts = best(stage + 1, stop)
            options.append((max(cost(stage, start, stop), rest), (stop, *cuts)))
        return min(options, key=lambda o: o[0])  # min keeps the first of equal costs: the earliest cut

    cuts = [0, *best(0, 0)[1], n]
    return [(cuts[i], cuts[i + 1]) for i in range(stages)]


def stage_bounds(model: HybridLM, stages: int, seq_len: int) -> Bounds:
    """Where ``model`` is cut into ``stages``: the ``|`` marks, else balanced by FLOPs per token."""
    cfg = model.config
    check_pipeline(cfg, stages)
    marked = marked_bounds(cfg.layer_pattern)
    if marked is not None:
        return marked
    costs = [block.layer.flops_per_token(seq_len) for block in model.blocks]
    return balanced_bounds(costs, stages, last_extra=2.0 * cfg.d_model * cfg.vocab_size)


def describe(pattern: str, bounds: Bounds) -> str:
    """The block pattern with ``|`` at the cuts (what to write in the config to pin this split)."""
    return STAGE_MARK.join(pattern[a:b] for a, b in bounds)


class EmbedLayer(nn.Module):
    """First layer: token ids to activations; ids and positions pass through."""

    #: as ``VocabParallelHead.gather_output``: off, the tied head on the last stage returns this
    #: rank's (B, T, V/N) logits (the pipeline engine's training step, for ``vocab_parallel_loss``)
    gather_output: bool = True

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, inputs: Carried) -> Carried:
        ids, doc_ids, position_ids = inputs
        return self.embed(ids), doc_ids, position_ids


class BlockLayer(nn.Module):
    """One residual block of the stack."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, inputs: Carried) -> Carried:
        x, doc_ids, position_ids = inputs
        y, _ = self.block(x, doc_ids=doc_ids, position_ids=position_ids)
        return y, doc_ids, position_ids


class FinalNormLayer(nn.Module):
    """The final norm; the head after it needs no ids."""

    def __init__(self, final_norm: nn.Module) -> None:
        super().__init__()
        self.final_norm = final_norm

    def forward(self, inputs: Carried) -> torch.Tensor:
        return self.final_norm(inputs[0])


class HeadLayer(nn.Module):
    """The untied LM head: (B, T, D) -> (B, T, V) logits."""

    def __init__(self, lm_head: nn.Linear) -> None:
        super().__init__()
        self.lm_head = lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def tied_head(embedding: EmbedLayer, x: torch.Tensor) -> torch.Tensor:
    """The LM head tied to the embedding (the same op as ``HybridLM``'s ``lm_head`` sharing the weight).
    A vocab-parallel embedding (tensor parallelism) holds this rank's vocabulary rows: the head is
    then the vocab-parallel head over them, logits gathered to the full vocabulary unless
    ``embedding.gather_output`` is off (then this rank's shard of them)."""
    group = getattr(embedding.embed, "tp_group", None)
    if group is None:
        return F.linear(x, embedding.embed.weight)
    from hybrid_lm.train.tensor_parallel import vocab_parallel_logits

    return vocab_parallel_logits(x, embedding.embed.weight, group, gather=embedding.gather_output)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``HybridLM``'s loss: mean token cross-entropy over labels != -100, in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def pipeline_layers(model: HybridLM) -> list[Any]:
    """``model`` as DeepSpeed pipeline layers: [embedding, blocks..., final norm, head].

    Layer ``i + 1`` is block ``i``; ``state_dict_names`` maps the per-layer checkpoint files back to
    ``HybridLM``'s names. Modules are passed built (DeepSpeed keeps those of its stage and drops the
    rest), so every stage holds exactly the weights of the one-process model.
    """
    from deepspeed.pipe import TiedLayerSpec

    embed = EmbedLayer(model.embed)
    blocks = [BlockLayer(b) for b in model.blocks]
    norm = FinalNormLayer(model.final_norm)
    if not model.config.tie_embeddings:
        return [embed, *blocks, norm, HeadLayer(model.lm_head)]
    # TiedLayerSpec builds its module on each stage that uses it; the builder hands over the one
    # already built (same seeded weights everywhere, and DeepSpeed broadcasts the first stage's anyway)
    return [TiedLayerSpec("embed", _Given, embed, tied_weight_attr=["embed.weight"]), *blocks, norm,
            TiedLayerSpec("embed", _Given, embed, forward_fn=tied_head, tied_weight_attr=["embed.weight"])]


class _Given(nn.Module):
    """A LayerSpec type (DeepSpeed wants a Module class) that returns the module it is given."""

    def __new__(cls, module: nn.Module) -> nn.Module:  # type: ignore[misc]
        return module


def spec_bounds(bounds: Bounds, n_blocks: int) -> list[int]:
    """DeepSpeed's ``parts`` for ``pipeline_layers``: stage s holds layers [parts[s], parts[s+1])."""
    return [0, *(start + 1 for start, _ in bounds[1:]), n_blocks + 3]


def state_dict_names(layer: int, n_blocks: int, key: str) -> str:
    """``HybridLM``'s name of ``key`` in the state dict of pipeline layer ``layer``."""
    if 1 <= layer <= n_blocks:
        assert key.startswith("block."), key
        return f"blocks.{layer - 1}.{key[len('block.'):]}"
    return key  # the embedding, final norm and head layers hold HybridLM's attribute names
