"""The neural long-term memory layer (Titans LMM; with ATLAS options), layer letter ``T``.

Per head h and token t (Titans paper sections 3.1 and 4.4):

    q, k, v  = SiLU(causal depthwise conv_4(x W_{q,k,v}))     ; q, k l2-normalised per head
    q, k    <- phi_p(q), phi_p(k)                             ; ATLAS polynomial features (optional)
    theta_t  = theta_max * sigmoid(x_t w_theta + b_theta)     ; inner learning rate
    eta_t    = sigmoid(x_t w_eta + b_eta)                     ; momentum (0 when spec.momentum is off)
    alpha_t  = sigmoid(x_t w_alpha + b_alpha)                 ; forget gate (0 when spec.decay is off)
    gamma_t  = sigmoid(x_t w_gamma + b_gamma)                 ; ATLAS Omega-window gate (c > 1)
    memory update and read-after-write retrieval y_t = M_{W_t}(q_t)   (kernels/titans/chunked.py)
    out      = W_o( RMSNorm_head(y) * SiLU(W_g x) )

Gates are per-head scalars from one linear map of x (rows ordered theta, eta, alpha, gamma, the
switched-off ones left out); the generic init (normal 0.02) leaves the weights small, so the
biases set the initial gates (``TitansConfig.*_bias_init``). The Omega gate
gamma_i belongs to token i and is the same for every window that contains i (our choice; the
paper writes gamma_i^(t)). The initial memory W_0 is a learned parameter per head (Xavier
uniform, as lucidrains), broadcast over the batch and restored at every document start.

State (``dict[str, Tensor]``, fp32 or wider): ``w{l}``, ``s{l}``, ``a{l}`` (memory weights,
momentum, weights at the start of the current chunk; (B, H, out, in)), ``offset`` (B,) tokens of
the current chunk done, ``conv``/``conv_valid`` and ``omega``/``omega_valid`` (causal tails).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.kernels.titans.chunked import chunked_memory_update, update_flops_per_token
from hybrid_lm.kernels.titans.memory_mlp import memory_dims
from hybrid_lm.models.common.mixer import Layer, State, linear_flops
from hybrid_lm.models.titans.config import MemoryUpdateConfig
from hybrid_lm.models.titans.features import PolyForm, PolynomialFeatures
from hybrid_lm.models.titans.streams import Streams, build_streams, causal_windows


@dataclass(kw_only=True)
class MemorySpec(MemoryUpdateConfig):
    """Everything one memory layer needs: the shared memory fields (``MemoryUpdateConfig``, copied
    from the ``titans`` section) plus its width and the ATLAS/DeepTransformer options."""

    d_model: int
    n_heads: int
    head_dim: int
    omega_window: int = 1
    poly_degree: int = 0
    poly_form: PolyForm = "tensor"
    ns_steps: int = 0
    bias: Literal["l2", "dot"] = "l2"
    momentum: bool = True
    """False: eta = 0, plain (stochastic) gradient steps (DeepTransformer)"""
    decay: bool = True
    """False: alpha = 0, the memory never forgets (DeepTransformer)"""
    gamma_bias_init: float = 3.0
    """Omega gate init: gamma ~ 0.95, i.e. the window starts (almost) unpruned"""


class NeuralMemory(Layer):
    stateful = True

    def __init__(self, spec: MemorySpec) -> None:
        super().__init__()
        self.spec = spec
        h, dh = spec.n_heads, spec.head_dim
        self.qkv = nn.Linear(spec.d_model, 3 * h * dh, bias=False)
        if spec.conv_size > 0:
            self.conv_weight = nn.Parameter(torch.empty(3 * h * dh, spec.conv_size))
            self.conv_bias = nn.Parameter(torch.zeros(3 * h * dh))
        names = ["theta"] + ["eta"] * spec.momentum + ["alpha"] * spec.decay + ["gamma"] * (spec.omega_window > 1)
        self.gate_names: tuple[str, ...] = tuple(names)
        self.n_gates = len(names)
        self.gates = nn.Linear(spec.d_model, self.n_gates * h, bias=True)
        self.features = PolynomialFeatures(dh, spec.poly_degree, spec.poly_form) if spec.poly_degree > 0 else None
        self.d_key = self.features.out_dim if self.features is not None else dh
        self.residual = spec.memory_residual and self.d_key == dh
        self.dims = memory_dims(self.d_key, dh, spec.memory_depth, spec.memory_expansion)
        self.w0 = nn.ParameterList(nn.Parameter(torch.empty(h, o, i)) for o, i in self.dims)
        self.out_norm = nn.RMSNorm(dh)
        self.gate_proj = nn.Linear(spec.d_model, h * dh, bias=False)
        self.out_proj = nn.Linear(h * dh, spec.d_model, bias=False)
        self.out_proj.weight._is_residual_projection = True  # type: ignore[attr-defined]
        # the inner learning rate, momentum and forget gates and the initial memory feed the fp32
        # memory recurrence, where a bf16 rounding compounds over every token: stored in fp32
        # under bf16/fp16 training, the gates computed in fp32 (``project``)
        for p in (*self.w0, *self.gates.parameters()):
            p._keep_fp32 = True  # type: ignore[attr-defined]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        s = self.spec
        for w in self.w0:
            bound = math.sqrt(6.0 / (w.size(1) + w.size(2)))  # Xavier uniform per head
            w.uniform_(-bound, bound)
        if s.conv_size > 0:
            nn.init.uniform_(self.conv_weight, -1 / math.sqrt(s.conv_size), 1 / math.sqrt(s.conv_size))
            self.conv_bias.zero_()
        h = s.n_heads
        inits = dict(theta=s.theta_bias_init, eta=s.momentum_bias_init, alpha=s.decay_bias_init, gamma=s.gamma_bias_init)
        self.gates.bias.copy_(torch.tensor([inits[n] for n in self.gate_names]).repeat_interleave(h))
        if self.features is not None:
            self.features.reset_parameters()

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> State:
        s = self.spec
        sdt = torch.promote_types(dtype, torch.float32)
        state: State = {"offset": torch.zeros(batch_size, dtype=torch.long, device=device)}
        for l, w in enumerate(self.w0):
            # not detached: with no carried state the learned W_0 must receive gradients
            w_b = w.to(device=device, dtype=sdt)[None].expand(batch_size, *w.shape).clone()
            state[f"w{l}"], state[f"a{l}"], state[f"s{l}"] = w_b, w_b.clone(), torch.zeros_like(w_b)
        c3 = 3 * s.n_heads * s.head_dim
        kc = max(s.conv_size - 1, 0)
        state["conv"] = torch.zeros(batch_size, kc, c3, device=device, dtype=dtype)
        state["conv_valid"] = torch.zeros(batch_size, kc, dtype=torch.bool, device=device)
        c = s.omega_window - 1
        width = s.n_heads * (2 * s.head_dim + 1)
        state["omega"] = torch.zeros(batch_size, c, width, device=device, dtype=dtype)
        state["omega_valid"] = torch.zeros(batch_size, c, dtype=torch.bool, device=device)
        return state

    def project(self, x: torch.Tensor, state: State, doc_ids: Optional[torch.Tensor]) -> tuple[dict[str, torch.Tensor], State]:
        """Per-token inputs of the kernel in row layout.

        x: (B, T, D) -> q (B, T, H, d_key), k (B, T, H, c, d_key), v (B, T, H, c, dh),
        gamma (B, T, H, c), theta/eta/alpha (B, T, H); plus the new causal tails.
        """
        s = self.spec
        bsz, seq_len, _ = x.shape
        h, dh, c = s.n_heads, s.head_dim, s.omega_window
        qkv = self.qkv(x)
        tails: State = {}
        if s.conv_size > 0:
            win, mask, tails["conv"], tails["conv_valid"] = causal_windows(
                qkv, state["conv"], state["conv_valid"], doc_ids, s.conv_size
            )
            qkv = torch.einsum("btkc,ck->btc", win * mask[..., None].to(win.dtype), self.conv_weight) + self.conv_bias
        qkv = F.silu(qkv).view(bsz, seq_len, 3, h, dh)
        q = F.normalize(qkv[:, :, 0], dim=-1)
        k = F.normalize(qkv[:, :, 1], dim=-1)
        v = qkv[:, :, 2]
        gate_in = x.to(self.gates.weight.dtype)  # fp32 gates (see __init__) also for bf16 activations
        g = dict(zip(self.gate_names, self.gates(gate_in).view(bsz, seq_len, self.n_gates, h).unbind(2)))
        theta = s.theta_max * torch.sigmoid(g["theta"])
        eta = torch.sigmoid(g["eta"]) if s.momentum else torch.zeros_like(theta)
        alpha = torch.sigmoid(g["alpha"]) if s.decay else torch.zeros_like(theta)
        if s.retention_mult != 1.0:  # one place for the chunked and the step path (step runs forward)
            alpha = 1.0 - (1.0 - alpha) * s.retention_mult
        gamma = torch.sigmoid(g["gamma"]) if c > 1 else torch.ones_like(theta)
        if c > 1:
            packed = torch.cat([k.flatten(2), v.flatten(2), gamma], dim=-1)
            win, mask, tails["omega"], tails["omega_valid"] = causal_windows(
                packed, state["omega"], state["omega_valid"], doc_ids, c
            )
            k = win[..., : h * dh].reshape(bsz, seq_len, c, h, dh).transpose(2, 3)
            v = win[..., h * dh : 2 * h * dh].reshape(bsz, seq_len, c, h, dh).transpose(2, 3)
            gamma = (win[..., 2 * h * dh :] * mask[..., None].to(win.dtype)).transpose(2, 3)
        else:
            k, v, gamma = k[:, :, :, None], v[:, :, :, None], gamma[..., None]
        if self.features is not None:
            q, k = self.features(q), self.features(k)
        return dict(q=q, k=k, v=v, gamma=gamma, theta=theta, eta=eta, alpha=alpha), tails

    def run_streams(self, inputs: dict[str, torch.Tensor], streams: Streams, state: State) -> tuple[torch.Tensor, State]:
        """Kernel over the streams. inputs in row layout (see ``project``) -> y (B, T, H, dh) and
        the memory part of the new state (per row, from the row's last stream)."""
        h = self.spec.n_heads
        n, length = streams.valid.shape
        fold = {name: streams.gather(t).transpose(1, 2).flatten(0, 1) for name, t in inputs.items()}  # (N*H, L, ...)
        rows, inh = streams.row, streams.inherits[:, None, None, None]
        w, sm, anc = [], [], []
        for l, w0 in enumerate(self.w0):
            init = w0.to(state[f"w{l}"].dtype)[None].expand(n, *w0.shape)
            w.append(torch.where(inh, state[f"w{l}"][rows], init).flatten(0, 1))
            anc.append(torch.where(inh, state[f"a{l}"][rows], init).flatten(0, 1))
            sm.append(torch.where(inh, state[f"s{l}"][rows], torch.zeros_like(init)).flatten(0, 1))
        valid = streams.valid[:, None].expand(n, h, length).flatten(0, 1)
        y, w_end, s_end, anchors = chunked_memory_update(
            w, sm, anc, fold["k"], fold["v"], fold["gamma"], fold["q"], fold["theta"], fold["eta"], fold["alpha"],
            valid, self.spec.chunk_size, residual=self.residual, ns_steps=self.spec.ns_steps, bias=self.spec.bias,
            max_grad_norm=self.spec.max_grad_norm,
        )
        y = streams.scatter(y.view(n, h, length, -1).transpose(1, 2), state["offset"].numel())
        b = self.spec.chunk_size
        last = streams.last
        end = streams.end[last]
        new: State = {"offset": end % b}
        chunk_of_end = (end // b).clamp_max(len(anchors) - 1)
        partial = (end % b != 0)[:, None, None, None]
        for l in range(len(self.w0)):
            shape = (n, h) + w_end[l].shape[1:]
            we = w_end[l].view(shape)[last]
            stacked = torch.stack([a[l] for a in anchors]).view(len(anchors), *shape)
            new[f"w{l}"], new[f"s{l}"] = we, s_end[l].view(shape)[last]
            new[f"a{l}"] = torch.where(partial, stacked[chunk_of_end, last], we)
        return y, new

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        state: Optional[State] = None,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        """x (B, T, D) -> y (B, T, D); state as in the module docstring."""
        if state is None:
            state = self.init_state(x.size(0), device=x.device, dtype=x.dtype)
        inputs, tails = self.project(x, state, doc_ids)
        streams = build_streams(doc_ids, state["offset"], x.size(1), self.spec.chunk_size)
        y, mem_state = self.run_streams(inputs, streams, state)
        out = self.output(y.to(x.dtype), x)
        return out, ({**state, **tails, **mem_state} if return_state else None)

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (B, T, H, dh), x (B, T, D) -> W_o(RMSNorm(y) * SiLU(W_g x)) (B, T, D)."""
        gated = self.out_norm(y).flatten(2) * F.silu(self.gate_proj(x))
        return self.out_proj(gated)

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        """One token is a one-token call: the carried chunk anchor makes it exactly the chunked rule."""
        y, new_state = self.forward(x[:, None], state=state, return_state=True)
        return y[:, 0], new_state

    def flops_per_token(self, seq_len: int) -> float:
        s = self.spec
        d, h, dh = s.d_model, s.n_heads, s.head_dim
        proj = linear_flops(d, 3 * h * dh) + linear_flops(d, self.n_gates * h) + linear_flops(d, h * dh) + linear_flops(h * dh, d)
        conv = 2.0 * s.conv_size * 3 * h * dh  # depthwise, as an einsum over the window
        kernel = h * update_flops_per_token(self.dims, s.chunk_size, s.omega_window, s.ns_steps,
                                            clamp=s.max_grad_norm is not None)
        return proj + conv + kernel
