"""Eval hook ``long_context``: loss and recurrent-state statistics by position, far past the training length.

    eval: {hooks: [val_loss, long_context, passkey], long_context_factor: 16}

State collapse (Stuffed Mamba, arXiv 2410.07145) shows as a per-token loss that rises past the
training length T together with a few heads whose state norm explodes while their decay stays
near 1. This hook measures both on one long validation stream of ``long_context_factor`` x T
tokens (T: the validation rows' length): the validation split read in order and treated as one
sequence (document starts do not reset any state: that is the regime a long prompt puts a layer
in; the stream is repeated when the split is shorter). It runs in segments of T tokens with every
layer's state carried, which equals one pass (the layer contract), and after each segment records:

* ``long_loss@P``: mean next-token loss over positions [P - T, P);
* ``long_state_rms/L<i><letter>@P``: RMS of block i's state entries after position P, over its
  heads; per head ``long_state_rms/L<i><letter>.h<h>@P`` for layers whose state has heads (Mamba-2's
  (B, H, P, N) ``ssm``); for other stateful layers the RMS over every floating state tensor;
* ``long_decay/L<i>M.h<h>@P``: Mamba-2's mean decay a_t = exp(dt·A) (knobs included) over the
  segment, per head (1: nothing forgotten).

Every rank reads its own validation shard; scores are averaged over ranks. ``hybrid-lm plot``
draws them by position (train/plot.py). The README's Evaluation section lists the hooks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.train.evaluation import EvalConfig, EvalContext, register_eval_hook


def long_validation_stream(ctx: EvalContext, n_tokens: int) -> tuple[torch.Tensor, int]:
    """(the first ``n_tokens`` of this rank's validation split in order, as (1, n) ids; the rows' T)."""
    pieces, have, seq_len = [], 0, 0
    for batch in ctx.make_val_loader():
        ids, labels = batch["input_ids"], batch["labels"]
        seq_len = ids.shape[1]
        # padding (the split's short last rows) is where a pad position's label and input are both ignored;
        # keep every token up to the last labelled one of the batch
        flat, lab = ids.reshape(-1), labels.reshape(-1)
        keep = int((lab != -100).nonzero().max()) + 2 if (lab != -100).any() else 0
        pieces.append(flat[:min(keep, flat.numel())])
        have += pieces[-1].numel()
        if have >= n_tokens:
            break
    if not have:
        raise RuntimeError("long_context: the validation split yielded no tokens")
    stream = torch.cat(pieces)
    while stream.numel() < n_tokens:  # a short split: repeat it, so every rank runs the same segments
        stream = torch.cat([stream, stream])
    return stream[None, :n_tokens], seq_len


def _state_rms(state: dict[str, torch.Tensor]) -> tuple[float, list[float]]:
    """(RMS over the layer's state, per-head RMS when the state is Mamba-2's (B, H, P, N) ssm)."""
    if "ssm" in state:
        per_head = state["ssm"].float().pow(2).mean(dim=(0, 2, 3)).sqrt()
        return float(per_head.pow(2).mean().sqrt()), per_head.tolist()
    tensors = [t.float() for t in state.values() if t.is_floating_point()]
    total = sum(float(t.pow(2).sum()) for t in tensors)
    count = sum(t.numel() for t in tensors)
    return (total / count) ** 0.5 if count else 0.0, []


@register_eval_hook("long_context")
def long_context(model: nn.Module, ctx: EvalContext, cfg: EvalConfig) -> dict[str, float]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return {}  # not the hybrid stack (no per-block states to read)
    probe, seq_len = long_validation_stream(ctx, 1)
    ids, _ = long_validation_stream(ctx, cfg.long_context_factor * seq_len + 1)
    ids = ids.to(ctx.device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    decays: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(blocks):
        layer = block.layer
        if hasattr(layer, "decays"):
            def grab(module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                decays[i] = module.decays(args[0]).float().mean(dim=(0, 1))  # (H,)
            hooks.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    raw: dict[str, float] = {}
    states = None
    try:
        for start in range(0, inputs.shape[1], seq_len):
            end = min(start + seq_len, inputs.shape[1])
            out = model(inputs[:, start:end], states=states, return_states=True)
            states = out.states
            loss = F.cross_entropy(out.logits.float()[0], targets[0, start:end])
            raw[f"long_loss@{end}"] = float(loss)
            for i, (block, state) in enumerate(zip(blocks, states)):
                if state is None:
                    continue
                name = f"L{i}{block.letter}"
                mean, per_head = _state_rms(state)
                raw[f"long_state_rms/{name}@{end}"] = mean
                for h, value in enumerate(per_head):
                    raw[f"long_state_rms/{name}.h{h}@{end}"] = value
                if i in decays:
                    for h, value in enumerate(decays[i].tolist()):
                        raw[f"long_decay/{name}.h{h}@{end}"] = value
    finally:
        for handle in hooks:
            handle.remove()
    out_scores = {}
    for key, value in raw.items():  # every rank ran the same segments: average over ranks
        total, count = ctx.sum_over_ranks(value, 1.0)
        out_scores[key] = total / count
    return out_scores
