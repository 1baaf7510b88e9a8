"""Titans memory-as-context (MAC), layer letter ``C`` (Titans paper section 4).

Per segment of ``segment_len`` tokens (segments restart at every document, see ``streams.py``):

    h   = W_h M*_{before}(l2norm(W_r x_seg))       # read with the memory as it was before the segment
    y   = Attn([P || h || x_seg])  at the x positions  # full causal attention inside the segment
    m   = LMM(RMSNorm_w(y))                         # write the segment's attention output, read after write
    o   = W_o( RMSNorm_a(y) * sigmoid(RMSNorm_b(m)) )

Causality (the paper is silent; h_j is read with token j's query, so an earlier token must not
see it): segment token i sees the persistent KV, ``h_j`` and ``x_j`` only for j <= i (h_j and x_j
share RoPE position j). The memory's write path has no short
convolution (``y`` is already contextualised by attention; keeps segment streams exact), no Omega
window and no polynomial map. ``m`` uses the exact per-token read-after-write of the kernel; the
chunk size must divide the segment length so the chunk grid follows the segment grid.

State: ``mem.*`` (memory weights/momentum/anchor), ``read{l}`` (weights at the start of the current
segment), ``seg_offset`` (B,), and the rotated keys/values of the current partial segment
``seg_k``/``seg_v`` (B, H, 2*segment_len, dh) with ``seg_valid`` (B, segment_len).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.kernels.titans.chunked import chunked_memory_update
from hybrid_lm.kernels.titans.memory_mlp import memory_forward
from hybrid_lm.models.attention.window import causal_context
from hybrid_lm.models.common.mixer import Layer, State, linear_flops
from hybrid_lm.models.common.registry import register_layer
from hybrid_lm.models.titans.attention import SlidingWindowAttention, rope
from hybrid_lm.models.titans.layers import memory_spec
from hybrid_lm.models.titans.memory import NeuralMemory
from hybrid_lm.models.titans.streams import build_streams

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig


class MemoryAsContext(Layer):
    stateful = True

    def __init__(self, config: "ModelConfig") -> None:
        super().__init__()
        t = config.titans
        if t.segment_len % t.chunk_size:
            raise ValueError(f"ModelConfig.titans.segment_len: {t.segment_len} is not a multiple of chunk_size={t.chunk_size}")
        d = config.d_model
        self.seg = t.segment_len
        self.memory = NeuralMemory(memory_spec(config, conv_size=0))
        spec = self.memory.spec
        self.h, self.dh = spec.n_heads, spec.head_dim
        self.read_q = nn.Linear(d, self.h * self.dh, bias=False)
        self.read_out = nn.Linear(self.h * self.dh, d, bias=False)
        self.attn = SlidingWindowAttention(d, t.n_heads, self.seg, t.n_persistent, t.rope_base)
        # the memory writes the attention output y, whose scale at init is that of a residual
        # projection (~1e-3): its l2-normalised keys and queries would amplify gradients by
        # 1/|y| (outer grad norm ~4.5e4 at init, NaN within 30 steps of tiny.yaml at 512 tokens);
        # a pre-norm gives the memory unit-scale input, as every other memory layer gets
        self.norm_write = nn.RMSNorm(d, eps=config.norm_eps)
        self.norm_attn = nn.RMSNorm(d, eps=config.norm_eps)
        self.norm_mem = nn.RMSNorm(d, eps=config.norm_eps)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.out_proj.weight._is_residual_projection = True  # type: ignore[attr-defined]

    def reset_parameters(self) -> None:
        self.memory.reset_parameters()
        if self.attn.persistent is not None:
            self.attn.persistent.reset_parameters()

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> State:
        mem = self.memory.init_state(batch_size, device=device, dtype=dtype)
        state: State = {f"mem.{k}": v for k, v in mem.items()}
        for l in range(len(self.memory.w0)):
            state[f"read{l}"] = mem[f"w{l}"].clone()
        a = self.attn
        state["seg_offset"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        state["seg_k"] = torch.zeros(batch_size, a.n_heads, 2 * self.seg, a.head_dim, device=device, dtype=dtype)
        state["seg_v"] = torch.zeros_like(state["seg_k"])
        state["seg_valid"] = torch.zeros(batch_size, self.seg, dtype=torch.bool, device=device)
        return state

    def _per_stream(self, state: State, key: str, rows: torch.Tensor, inherits: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        src = state[key][rows]
        return torch.where(inherits.view(-1, *([1] * (src.dim() - 1))), src, fresh.to(src.dtype).expand_as(src))

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, *, state: Optional[State] = None, doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None, return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        """x (B, T, D) -> (B, T, D)."""
        bsz, seq_len, _ = x.shape
        if state is None:
            state = self.init_state(bsz, device=x.device, dtype=x.dtype)
        C, H, dh, a = self.seg, self.h, self.dh, self.attn
        streams = build_streams(doc_ids, state["seg_offset"], seq_len, C)
        n, length = streams.valid.shape
        rows, inh = streams.row, streams.inherits
        xs = streams.gather(x)  # (N, L, D)
        qr = F.normalize(self.read_q(xs).view(n, length, H, dh), dim=-1).transpose(1, 2).flatten(0, 1)  # (N*H, L, dh)
        w, s, anc, read = [], [], [], []
        for l, w0 in enumerate(self.memory.w0):
            init = w0[None]
            w.append(self._per_stream(state, f"mem.w{l}", rows, inh, init).flatten(0, 1))
            anc.append(self._per_stream(state, f"mem.a{l}", rows, inh, init).flatten(0, 1))
            read.append(self._per_stream(state, f"read{l}", rows, inh, init).flatten(0, 1))
            s.append(self._per_stream(state, f"mem.s{l}", rows, inh, torch.zeros_like(init)).flatten(0, 1))
        cache_k = self._per_stream(state, "seg_k", rows, inh, torch.zeros(()))
        cache_v = self._per_stream(state, "seg_v", rows, inh, torch.zeros(()))
        cache_valid = state["seg_valid"][rows] & inh[:, None]
        pos = torch.arange(C, device=x.device)[None].expand(n, C)
        causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
        pers = a.persistent.expand(n, x.dtype) if a.persistent is not None else None
        outs, snaps, anchors = [], [], []
        for start in range(0, length, C):
            sl = slice(start, start + C)
            valid = streams.valid[:, sl]
            hq = memory_forward(read, qr[:, sl], self.memory.residual)  # (N*H, C, dh)
            h_tok = self.read_out(hq.view(n, H, C, dh).transpose(1, 2).flatten(2))  # (N, C, D)
            qkv = a.qkv(torch.cat([h_tok, xs[:, sl]], dim=1)).view(n, 2 * C, 3, a.n_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            pos2 = torch.cat([pos, pos], dim=1)
            q, k, v = rope(qkv[0][:, :, C:], pos, a.rope_base), rope(qkv[1], pos2, a.rope_base), qkv[2]
            if start == 0:  # slots already seen by the previous call come from its cache
                use = torch.cat([cache_valid, cache_valid], dim=1)[:, None, :, None]
                k, v = torch.where(use, cache_k, k), torch.where(use, cache_v, v)
                valid = valid | cache_valid
            see = causal[None] & valid[:, None, :]  # (N, C, C)
            mask = torch.cat([see, see], dim=2)
            keys, vals = k, v
            if pers is not None:
                keys, vals = torch.cat([pers[0], k], dim=2), torch.cat([pers[1], v], dim=2)
                mask = torch.cat([mask.new_ones(n, C, a.persistent.n), mask], dim=2)
            att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask[:, None])
            y = a.o_proj(att.transpose(1, 2).reshape(n, C, -1))  # -1: the local heads under TP
            yn = self.norm_write(y)
            inputs, _ = self.memory.project(yn, self.memory.init_state(n, device=x.device, dtype=x.dtype), None)
            fold = {name: t.transpose(1, 2).flatten(0, 1) for name, t in inputs.items()}
            m, w, s, seg_anchors = chunked_memory_update(
                w, s, anc, fold["k"], fold["v"], fold["gamma"], fold["q"], fold["theta"], fold["eta"], fold["alpha"],
                streams.valid[:, sl, None].expand(n, C, H).transpose(1, 2).flatten(0, 1), self.memory.spec.chunk_size,
                residual=self.memory.residual, max_grad_norm=self.memory.spec.max_grad_norm,
            )
            anc = w
            m_out = self.memory.output(m.view(n, H, C, dh).transpose(1, 2).to(x.dtype), yn)
            outs.append(self.out_proj(self.norm_attn(y) * torch.sigmoid(self.norm_mem(m_out))))
            anchors.extend(seg_anchors)
            snaps.append((read, k, v))
            read = w
        out = streams.scatter(torch.cat(outs, dim=1), bsz)
        if not return_state:
            return out, None
        return out, self._final_state(streams, w, s, anchors, snaps, n)

    def _final_state(self, streams, w, s, anchors, snaps, n) -> State:  # type: ignore[no-untyped-def]
        """Per row, the state after its last token (padding slots after it are no-ops)."""
        C, b = self.seg, self.memory.spec.chunk_size
        last = streams.last
        end = streams.end[last]
        partial_seg = end % C != 0
        seg_idx = (end // C).clamp_max(len(snaps) - 1)
        chunk_idx = (end // b).clamp_max(len(anchors) - 1)
        new: State = {"seg_offset": end % C, "mem.offset": end % b}
        for l in range(len(w)):
            shape = (n, self.h) + w[l].shape[1:]
            we = w[l].view(shape)[last]
            new[f"mem.w{l}"], new[f"mem.s{l}"] = we, s[l].view(shape)[last]
            anc = torch.stack([a[l] for a in anchors]).view(len(anchors), *shape)[chunk_idx, last]
            new[f"mem.a{l}"] = torch.where((end % b != 0)[:, None, None, None], anc, we)
            rd = torch.stack([sn[0][l] for sn in snaps]).view(len(snaps), *shape)[seg_idx, last]
            new[f"read{l}"] = torch.where(partial_seg[:, None, None, None], rd, we)
        ks = torch.stack([sn[1] for sn in snaps])[seg_idx, last]
        vs = torch.stack([sn[2] for sn in snaps])[seg_idx, last]
        new["seg_k"], new["seg_v"] = ks, vs
        new["seg_valid"] = torch.arange(C, device=end.device)[None] < (end % C)[:, None]
        return new

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        y, new_state = self.forward(x[:, None], state=state, return_state=True)
        return y[:, 0], new_state

    def flops_per_token(self, seq_len: int) -> float:
        d, hd = self.out_proj.in_features, self.h * self.dh
        n_w = sum(o * i for o, i in self.memory.dims)
        read = linear_flops(d, hd) + self.h * 2 * n_w + linear_flops(hd, d)
        # q/k/v of both the memory read h and the segment's x; a query at i sees h_j and x_j for j <= i
        ctx = 2 * causal_context(min(seq_len, self.seg)) + (self.attn.persistent.n if self.attn.persistent else 0)
        attn = 2 * linear_flops(d, 3 * d) + linear_flops(d, d) + 4.0 * d * ctx
        return read + attn + self.memory.flops_per_token(seq_len) + linear_flops(d, d)


@register_layer("C", "titans_mac", "Titans memory-as-context: segment attention over [persistent, memory read, segment]")
def build_mac(config: "ModelConfig", layer_index: int) -> MemoryAsContext:
    return MemoryAsContext(config)
