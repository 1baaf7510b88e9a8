"""The hybrid language model: embeddings, a pattern of pre-norm residual blocks, tied LM head.

The stack knows nothing about any family: each block builds its layer from the registry by the
pattern letter and talks to it only through ``models/common/mixer.py``. Nor does it know about
parallelism or training: the engine in ``train/`` wraps it from outside.

Shapes: ``input_ids`` (B, T) int64 -> ``logits`` (B, T, V). States are a list with one entry per
block and loop (None for stateless layers).

With ``config.recursion.loops = L > 1`` the blocks are one shared block applied L times (the
relaxed recursive transformer, ``models/recursive/``): state entry ``l * n_blocks + i`` belongs to
block i in loop l, since a looped recurrent layer is L distinct recurrences sharing weights. Per-loop
LoRA is attached to the block's linears from ``models/recursive/lora.py``; the stack only says which
loop runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.models.common.mixer import Layer, State
from hybrid_lm.models.common.registry import get_layer_spec
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.recursive.early_exit import generate_with_early_exit
from hybrid_lm.models.recursive.lora import LoopIndex, LoopLoRALinear, apply_loop_lora

States = list[Optional[State]]


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, V)"""
    loss: Optional[torch.Tensor] = None
    """mean token cross-entropy over labels != -100, when labels were given"""
    states: Optional[States] = None


class Block(nn.Module):
    """x + layer(RMSNorm(x)), with the layer's state passed through."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.letter = config.block_pattern[layer_index]
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.layer: Layer = get_layer_spec(self.letter).build(config, layer_index)

    def forward(
        self,
        x: torch.Tensor,
        *,
        state: Optional[State] = None,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        y, new_state = self.layer(
            self.norm(x), state=state, doc_ids=doc_ids, position_ids=position_ids, return_state=return_state
        )
        return x + y, new_state

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        y, new_state = self.layer.step(self.norm(x), state)
        return x + y, new_state


def rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


class HybridLM(nn.Module):
    """The stack. ``HybridLM(cfg)`` is initialised (``init_weights``) from the RNG state at the call.

    Built under ``with torch.device("meta"):`` it allocates nothing and is not initialised: give it
    storage and weights later (``hybrid_lm.train.meta_init``: after tensor parallelism has cut it,
    so a rank only ever allocates its shard). Both ways give the same weights from the same RNG
    state, because the submodules' own constructor inits (which ``init_weights`` overwrites) draw
    from a forked RNG and every parameter is set by ``init_weights``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=rng_devices()):
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_blocks))
            self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.embed.weight
            rec = config.recursion
            self.loops = rec.loops
            self.loop = LoopIndex()
            if rec.lora_rank:
                apply_loop_lora(self.blocks, loops=rec.loops, rank=rec.lora_rank, targets=rec.lora_targets,
                                loop=self.loop)
        if not self.embed.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Generic init (normal(0, init_std) for matmuls and embeddings, zero biases), the
        GPT-2/mamba_ssm rescale of residual output projections by 1/sqrt(n_blocks), then each
        layer's own init (Mamba-2: A_log, dt_bias, D, conv).

        One normal init for every matmul is the convention of Megatron's hybrid models and
        NemotronH, so attention and Mamba-2 layers start on the same scale. It is a choice, not
        mamba_ssm's recipe: mamba_ssm keeps PyTorch's Kaiming-uniform for the Mamba linears
        (std 1/sqrt(3 fan_in), 0.036 at width 256) and re-draws out_proj the same way before the
        rescale (as mamba_ssm initialises Mamba-2)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm):  # ones; set here so that no parameter keeps a constructor value
                module.reset_parameters()
        if self.config.rescale_prenorm_residual:
            scale = 1.0 / math.sqrt(self.config.n_blocks)
            for p in self.parameters():
                if getattr(p, "_is_residual_projection", False):
                    p.mul_(scale)
        for block in self.blocks:
            block.layer.reset_parameters()
        for module in self.modules():
            if isinstance(module, LoopLoRALinear):
                module.reset_lora()

    def init_states(self, batch_size: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> States:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return [b.layer.init_state(batch_size, device=device, dtype=dtype) for _ in range(self.loops) for b in self.blocks]

    def unrolled_blocks(self) -> list[tuple[int, int, Block]]:
        """(loop, state index, block) in execution order; sets nothing (see ``run_loop``)."""
        n = len(self.blocks)
        return [(loop, loop * n + i, block) for loop in range(self.loops) for i, block in enumerate(self.blocks)]

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        states: Optional[States] = None,
        return_states: bool = False,
    ) -> ModelOutput:
        hidden, new_states = self.hidden_states(self.embed(input_ids), doc_ids=doc_ids, position_ids=position_ids,
                                                states=states, return_states=return_states)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, states=new_states if return_states else None)

    def step(self, input_ids: torch.Tensor, states: States) -> tuple[torch.Tensor, States]:
        """One decode step: input_ids (B,) -> logits (B, V), new states."""
        hidden, new_states = self.step_hidden(self.embed(input_ids), states)
        return self.lm_head(hidden), new_states

    def hidden_states(self, x: torch.Tensor, *, doc_ids: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None, states: Optional[States] = None,
                      return_states: bool = False) -> tuple[torch.Tensor, States]:
        """The blocks and the final norm on input embeddings x (B, T, D) -> (hidden (B, T, D), states):
        ``forward`` without the embedding and the head, for wrappers that feed embeddings of their
        own (HMT's memory tokens, ``models/hmt/``)."""
        new_states: States = []
        for loop, i, block in self.unrolled_blocks():
            self.loop.value = loop
            x, s = block(
                x,
                state=None if states is None else states[i],
                doc_ids=doc_ids,
                position_ids=position_ids,
                return_state=return_states,
            )
            new_states.append(s)
        return self.final_norm(x), new_states

    def step_hidden(self, x: torch.Tensor, states: States) -> tuple[torch.Tensor, States]:
        """``step`` on an input embedding x (B, D) -> (final-normed hidden (B, D), new states)."""
        new_states: States = []
        for loop, i, block in self.unrolled_blocks():
            self.loop.value = loop
            x, s = block.step(x, states[i])
            new_states.append(s)
        return self.final_norm(x), new_states

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prefill with the parallel form, then decode with ``step``; greedy when temperature == 0.

        input_ids (B, T) -> (B, T + max_new_tokens). A looped model with
        ``recursion.exit_threshold`` set exits early (``models/recursive/early_exit.py``).
        """
        if self.loops > 1 and self.config.recursion.exit_threshold is not None:
            return generate_with_early_exit(self, input_ids, max_new_tokens, threshold=self.config.recursion.exit_threshold,
                                            temperature=temperature, generator=generator)[0]
        out = self(input_ids, return_states=True)
        states = out.states
        assert states is not None
        logits = out.logits[:, -1]
        tokens = [input_ids]
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(dim=-1)
            tokens.append(nxt[:, None])
            logits, states = self.step(nxt, states)
        return torch.cat(tokens, dim=1)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (Megatron convention; x3 for training), LM head included."""
        d, v = self.config.d_model, self.config.vocab_size
        block = sum(b.layer.flops_per_token(seq_len) for b in self.blocks)
        lora = sum(2.0 * m.lora_A.shape[1] * (m.in_features + m.out_features)
                   for m in self.blocks.modules() if isinstance(m, LoopLoRALinear))
        return self.loops * (block + lora) + 2.0 * d * v

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n
