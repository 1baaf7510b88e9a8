"""Memory and step-time plan of a job on N GPUs, before anything is launched.

    hybrid-lm plan configs/hybrid_7b.yaml --gpus 32 --gpu h100
    hybrid-lm plan configs/hybrid_1b.yaml --gpus 8 --gpu a100-40gb data.micro_batch_size=4 --mfu 0.35

The model is built on the meta device (no memory, exact parameter count and FLOPs per token), cut
into the pipeline stages the trainer would make (``train/pipeline.py``), and each GPU's memory is
added up for the worst stage:

* weights, gradients and optimizer state, with the bytes per parameter of the ZeRO paper's
  mixed-precision AdamW (bf16: 2 + 2 + 12, the 12 being the fp32 master weights and two moments;
  fp32: 4 + 4 + 8), each divided by the tensor x pipeline split, and by the ZeRO shard degree
  (data x context ranks) for what the stage shards: optimizer state from stage 1 (nothing on the
  GPU with ``cpu_offload``), gradients from 2, weights at 3. Not counted: the fp32 gradient buffer
  DeepSpeed's bf16 optimizers may keep besides (up to 4 bytes per parameter, depending on the
  wrapper DeepSpeed picks; ``bench/gpu_check.py`` measures the whole peak on a GPU), ZeRO-3's
  gathered layer, and the fused kernels' workspaces;
* activations of one micro-batch of ``data.micro_batch_size`` x ``data.seq_len / context_parallel``
  tokens, from the per-family counts in ``_layer_elements`` (what autograd keeps for backward),
  times the micro-batches a 1F1B pipeline keeps in flight on its first stage (``min(stages,
  micro-batches)``), plus the LM head's logits on the last; with activation checkpointing of every
  block only each block's input stays, plus one block recomputed during backward;
* a reserve of 10% of the GPU for the CUDA context, NCCL buffers and allocator fragmentation.

The step time is the training FLOPs of one optimizer step (3 x ``HybridLM.flops_per_token``, the
Megatron/PaLM convention ``train/metrics.py`` reports MFU with) over the GPUs' dense bf16 peak at
the stated MFU. Recomputation under checkpointing is not model FLOPs: it shows as a lower MFU.

Accuracy: the activation counts were fitted to the tensors our PyTorch paths save on CPU and are
held to the measured peak within [0.75x, 1.33x], one family at a time and with full checkpointing,
by ``tests/train/test_plan.py`` (measured there: 0.91-1.05 without checkpointing, 0.94-1.12 with).
The fused CUDA paths (mamba_ssm, flash-attn) are counted from what those kernels save, not
measured: no GPU has run them yet (``bench/gpu_check.py`` prints the measured peak beside this
estimate when one does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.train.metrics import GpuSpec

GIB = 2**30
#: share of a GPU's memory the plan leaves free (CUDA context ~0.5 GiB, NCCL buffers, fragmentation)
RESERVE = 0.10


@dataclass
class Layout:
    gpus: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    """block inputs and norms split over the tensor-parallel ranks too (``parallel.sequence_parallel``)"""
    zero_stage: int = 0
    cpu_offload: bool = False
    dtype: str = "bf16"
    micro_batch_size: int = 1
    seq_len: int = 4096
    micro_batches: int = 1
    """micro-batches per optimizer step on each rank (each pipeline)"""

    @property
    def model_ranks(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    @property
    def data_parallel(self) -> int:
        return self.gpus // self.model_ranks

    @property
    def zero_shards(self) -> int:
        """Ranks DeepSpeed shards ZeRO state over: the data x context group."""
        return self.data_parallel * self.context_parallel


@dataclass
class Plan:
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    """no activation checkpointing"""
    activations_checkpointed: float
    """every block checkpointed (``parallel.activation_checkpointing=full``)"""
    activations_config: float
    """what the config asks for (none, full, or the selected letters)"""
    capacity: float
    """bytes the plan lets a GPU use (its memory less the reserve)"""
    tokens_per_step: int
    step_time_s: float
    tokens_per_s: float
    notes: list[str]

    def total(self, activations: Optional[float] = None) -> float:
        """Bytes per GPU with ``activations`` (default: the config's checkpointing)."""
        acts = self.activations_config if activations is None else activations
        return self.weights + self.gradients + self.optimizer + acts

    def fits(self, activations: Optional[float] = None) -> bool:
        return self.total(activations) <= self.capacity


def _bytes(dtype: str) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter: ZeRO paper's mixed-precision AdamW."""
    return (2, 2, 12) if dtype in ("bf16", "fp16") else (4, 4, 8)


def _layer_elements(letter: str, layer: nn.Module, cfg: ModelConfig, fused: bool) -> tuple[float, float]:
    """(activation-dtype elements, fp32 elements) a block's layer keeps per token for backward, before
    any tensor split. Block norm and residual are ``_block_elements``; the counts per family:

    * ``-`` SwiGLU: gate, up, SiLU(gate) and their product (4 x hidden).
    * ``A`` attention: rotated q and k, v, the output (2 x q width + 2 x kv width), RoPE cos/sin
      (2 x head dim); fp32: the softmax log-sum-exp (one per head). Same for SDPA and flash-attn.
    * ``M`` Mamba-2, PyTorch chunked SSD (fitted to CPU measurements: within 1% at d_model 64-128
      and chunks 32-64; the test's smaller model measures 0.91): in_proj output, conv output and
      SiLU, gated norm (7 d_inner + 6 G N); fp32 inside the scan: x copies (6 d_inner), the
      per-head Q x Q decay and masked scores (2 H Q), chunk and passed states (2 d_inner N / Q). mamba_ssm: in_proj output, conv output, y and norm output (5 d_inner + 4 G N
      + H); fp32: dt and its chunk cumsum (2 H); its kernels recompute the rest.
    * Memory letters (``T`` alone, inside ``C``/``G``/``L``, ``X``/``D``): all fp32 (the inner loop
      runs in fp32), fitted to CPU measurements of ``T`` at d_model 64-128 (within 8%):
      52 x memory width (q/k/v, conv, gates, features, output gate) + 13 x the memory MLP's
      hidden width + 1.07 x the memory MLP's weights per head over the chunk (one copy of the
      weights, momentum and gradients per chunk). ``G``/``L``/``C`` add their sliding-window
      attention as ``A`` (not fitted).
    """
    d = cfg.d_model
    if letter == "-":
        return 4.0 * cfg.mlp_hidden_size, 0.0
    if letter == "A":
        hq, hkv = layer.n_heads * layer.head_dim, layer.n_kv_heads * layer.head_dim
        return 2.0 * hq + 2.0 * hkv + 2.0 * layer.head_dim, float(layer.n_heads)
    if letter == "M":
        di, h, n, g = layer.d_inner, layer.nheads, layer.d_state, layer.ngroups
        q = layer.chunk_size
        if fused:
            return 5.0 * di + 4.0 * g * n + h, 2.0 * h
        return 7.0 * di + 6.0 * g * n, 6.0 * di + 2.0 * h * q + 2.0 * di * n / q
    act, fp32 = 0.0, 0.0
    found = False
    for module in layer.modules():
        if hasattr(module, "w0") and hasattr(module, "spec"):  # a NeuralMemory (Titans/ATLAS)
            found = True
            spec = module.spec
            width = spec.n_heads * spec.head_dim
            hidden = width * spec.memory_expansion
            weights_per_head = sum(w.numel() for w in module.w0)
            fp32 += 52.0 * width + 13.0 * hidden + 1.07 * weights_per_head / spec.chunk_size
        elif hasattr(module, "persistent") and hasattr(module, "qkv"):  # their sliding-window attention
            found = True
            act += 4.0 * d + 2.0 * module.head_dim
            fp32 += module.n_heads
    if not found:
        raise ValueError(f"no activation count for layer letter {letter!r} ({type(layer).__name__})")
    return act, fp32


def _block_elements(d: int) -> tuple[float, float]:
    """Every pre-norm block: its input, the normalised input and the weighted norm (3 d) + rstd."""
    return 3.0 * d, 1.0


def _head_elements(cfg: ModelConfig, act_bytes: int) -> tuple[float, float]:
    """Final norm, logits (V), their fp32 copy for the loss unless already fp32, log-softmax (V fp32),
    and the fp32 gradient of the logits, alive with them when backward starts."""
    d, v = cfg.d_model, cfg.vocab_size
    return 3.0 * d + v, 1.0 + (3.0 if act_bytes < 4 else 2.0) * v


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def activation_bytes_per_token(model: nn.Module, *, act_bytes: int, fused: bool, tp: int = 1, cp: int = 1,
                               sp: bool = False) -> list[float]:
    """Bytes per local token each block keeps for backward (block norm + layer), layer internals
    split over ``tp`` tensor-parallel ranks, block inputs and norms too with sequence parallelism
    ``sp`` (replicated without). With ``cp`` context-parallel ranks attention also keeps the K/V it gathered from the
    others ((cp - 1) x the kv width per local token); a looped (recursive) stack keeps each block's
    activations once per loop."""
    stack = _backbone(model)
    cfg = stack.config
    loops = getattr(stack, "loops", 1)
    out = []
    for block in stack.blocks:
        la, lf = _layer_elements(block.letter, block.layer, cfg, fused)
        if block.letter == "A" and cp > 1:
            la += 2.0 * block.layer.n_kv_heads * block.layer.head_dim * (cp - 1)
        ba, bf = _block_elements(cfg.d_model)
        out.append(loops * ((ba * act_bytes + bf * 4) / (tp if sp else 1) + (la * act_bytes + lf * 4) / tp))
    return out


def head_bytes_per_token(model: nn.Module, *, act_bytes: int) -> float:
    a, f = _head_elements(_backbone(model).config, act_bytes)
    return a * act_bytes + f * 4


def build_meta(cfg: ModelConfig) -> nn.Module:
    from hybrid_lm.models.kinds import build_lm

    with torch.device("meta"):
        return build_lm(cfg)


def _stage_params(model: nn.Module, bounds: list[tuple[int, int]]) -> list[int]:
    """Parameters each pipeline stage holds: its blocks, the embedding (and anything outside the
    stack) on the first, final norm and head on the last (a tied head is a copy of the embedding
    there when the stages are several)."""
    stack = _backbone(model)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    per_block = [count(b.parameters()) for b in stack.blocks]
    embed, norm = stack.embed.weight.numel(), count(stack.final_norm.parameters())
    tied = stack.lm_head.weight is stack.embed.weight
    head = 0 if tied and len(bounds) == 1 else stack.lm_head.weight.numel()
    untied_head = 0 if tied else stack.lm_head.weight.numel()
    rest = count(model.parameters()) - sum(per_block) - embed - norm - untied_head
    out = [sum(per_block[a:b]) for a, b in bounds]
    out[0] += embed + rest
    out[-1] += norm + head
    return out


def plan(cfg: ModelConfig, layout: Layout, gpu: GpuSpec, *, mfu: float = 0.4, checkpoint_letters: str = "",
         fused: Optional[bool] = None) -> Plan:
    """Memory per GPU and step time of ``cfg`` under ``layout`` on ``gpu`` (see the module docstring).

    ``checkpoint_letters``: the layer letters whose blocks the run checkpoints ("" none, "all" every
    block): what ``activations_config`` and ``fits()`` count.

    ``fused``: count the mamba_ssm activations (default: whenever the Mamba-2 backend is not
    forced to ``torch``, since a GPU run uses mamba_ssm when installed)."""
    if layout.gpus % layout.model_ranks:
        raise ValueError(f"--gpus {layout.gpus} is not a multiple of tensor_parallel x pipeline_parallel x "
                         f"context_parallel = {layout.model_ranks}")
    if layout.seq_len % layout.context_parallel:
        raise ValueError(f"data.seq_len={layout.seq_len} does not divide by context_parallel={layout.context_parallel}")
    if fused is None:
        fused = cfg.mamba2.backend != "torch"
    from hybrid_lm.train.pipeline import stage_bounds

    model = build_meta(cfg)
    stack = _backbone(model)
    pp, tp = layout.pipeline_parallel, layout.tensor_parallel
    bounds = stage_bounds(stack, pp, layout.seq_len) if pp > 1 else [(0, len(stack.blocks))]
    params = sum(p.numel() for p in model.parameters())
    local = max(_stage_params(model, bounds)) / tp
    wb, gb, ob = _bytes(layout.dtype)
    shards = layout.zero_shards
    weights = wb * local / (shards if layout.zero_stage >= 3 else 1)
    gradients = gb * local / (shards if layout.zero_stage >= 2 else 1)
    optimizer = 0.0 if layout.cpu_offload else ob * local / (shards if layout.zero_stage >= 1 else 1)

    act_bytes = 4 if layout.dtype == "fp32" else 2
    per_block = activation_bytes_per_token(model, act_bytes=act_bytes, fused=fused, tp=tp, cp=layout.context_parallel,
                                           sp=layout.sequence_parallel)
    head = head_bytes_per_token(model, act_bytes=act_bytes)
    tokens = layout.micro_batch_size * layout.seq_len // layout.context_parallel
    letters = [b.letter for b in stack.blocks]
    loops = getattr(stack, "loops", 1)

    def stage_max(recomputed: str) -> float:
        """Worst stage's activation bytes when the blocks of the ``recomputed`` letters are checkpointed:
        those keep their input only, and one of them at a time is rebuilt during backward (counted
        alongside the head's tensors: an upper bound, they need not coexist)."""
        worst = 0.0
        for s, (a, b) in enumerate(bounds):
            in_flight = min(pp - s, layout.micro_batches)  # 1F1B: stage s holds pp - s micro-batches
            kept = sum(loops * cfg.d_model * act_bytes if letters[i] in recomputed else per_block[i] for i in range(a, b))
            rebuilt = max((per_block[i] for i in range(a, b) if letters[i] in recomputed), default=0.0)
            worst = max(worst, tokens * (in_flight * kept + rebuilt + (head if s == pp - 1 else 0.0)))
        return worst

    all_letters = "".join(sorted(set(letters)))
    fpt = 3.0 * stack.flops_per_token(layout.seq_len)
    tokens_per_step = layout.micro_batch_size * layout.seq_len * layout.micro_batches * layout.data_parallel
    step = fpt * tokens_per_step / (layout.gpus * gpu.peak_bf16 * mfu)
    notes = []
    if fused and "M" in cfg.block_pattern:
        notes.append("Mamba-2 activations counted for mamba_ssm's kernels (model.mamba2.backend=torch: the "
                     "PyTorch scan's, larger)")
    if set(cfg.block_pattern) & set("TCGLXD"):
        notes.append("memory letters counted in fp32 from a CPU fit of T (their attention branches: not fitted)")
    if stack is not model:
        notes.append(f"model kind {cfg.kind}: the backbone stack is counted, not the wrapper's own segments and tokens")
    if pp > 1:
        notes.append(f"pipeline stages {bounds} (blocks); worst stage shown")
    return Plan(params=params, weights=weights, gradients=gradients, optimizer=optimizer,
                activations=stage_max(""), activations_checkpointed=stage_max(all_letters),
                activations_config=stage_max(all_letters if checkpoint_letters == "all" else checkpoint_letters),
                capacity=gpu.memory_gib * GIB * (1 - RESERVE), tokens_per_step=tokens_per_step,
                step_time_s=step, tokens_per_s=tokens_per_step / step, notes=notes)


def format_plan(p: Plan, layout: Layout, gpu: GpuSpec, mfu: float, checkpointing: str) -> str:
    """The table ``hybrid-lm plan`` prints; ``checkpointing`` describes the config's choice."""
    g = lambda x: f"{x / GIB:8.2f} GiB"  # noqa: E731
    step = f"{p.step_time_s:.2f} s" if p.step_time_s >= 1 else f"{p.step_time_s * 1e3:.3g} ms"
    lines = [
        f"model: {p.params / 1e9:.3f}B parameters ({p.params:,})",
        f"layout: {layout.gpus} x {gpu.name} ({gpu.memory_gib:.0f} GiB, {gpu.peak_bf16 / 1e12:.0f} TFLOP/s bf16 dense): "
        f"TP={layout.tensor_parallel} PP={layout.pipeline_parallel} CP={layout.context_parallel} "
        f"DP={layout.data_parallel} ZeRO-{layout.zero_stage}{' +offload' if layout.cpu_offload else ''} {layout.dtype}",
        f"batch: micro-batch {layout.micro_batch_size} x {layout.seq_len} tokens, {layout.micro_batches} micro-batches "
        f"per step, {p.tokens_per_step:,} tokens per step",
        "memory per GPU (worst pipeline stage)     no checkpointing   every block checkpointed",
        f"  weights            {g(p.weights)}",
        f"  gradients          {g(p.gradients)}",
        f"  optimizer state    {g(p.optimizer)}",
        f"  activations        {g(p.activations)}       {g(p.activations_checkpointed)}",
        f"  total              {g(p.total(p.activations))}       {g(p.total(p.activations_checkpointed))}",
        f"  usable             {g(p.capacity)}   ({gpu.memory_gib:.0f} GiB less {RESERVE:.0%} reserve)",
        f"this config (activation checkpointing: {checkpointing}): {p.total() / GIB:.2f} GiB per GPU, "
        f"{'fits' if p.fits() else 'does NOT fit'}",
        f"step time at {mfu:.0%} MFU: {step} ({p.tokens_per_s:,.0f} tokens/s, {p.tokens_per_s / layout.gpus:,.0f} per GPU)",
    ]
    return "\n".join(lines + [f"note: {n}" for n in p.notes])
