"""The Mamba-2 mixer (SSD), layer letter ``M``, following mamba_ssm's ``Mamba2`` (shapes, forward,
init, decode, documents).

    zxbcdt = in_proj(u)                       split [z, xBC, dt]  sizes [d_inner, conv_dim, H]
    xBC    = SiLU(causal depthwise conv(xBC))  split [x, B, C]     sizes [d_inner, G·N, G·N]
    dt     = softplus(dt + dt_bias)  (fp32);   A = -exp(A_log)
    y      = SSD(x, dt, A, B, C) + D·x;        out = out_proj(GatedRMSNorm(y, z))

Parameter names are mamba_ssm's / HF ``Mamba2Mixer``'s (``in_proj, conv1d, dt_bias, A_log, D,
norm.weight, out_proj``) so checkpoints map by prefix only (``hf_mapping.py``).

State: ``conv`` (B, conv_dim, d_conv-1), the last pre-conv xBC inputs in the activations' dtype,
and ``ssm`` (B, H, P, N) in fp32 (fp64 for fp64 models). The training path is the PyTorch chunked SSD
(``kernels/ssd/chunked.py``); mamba_ssm's fused kernels replace it on CUDA when installed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.kernels.ssd.chunked import clamp_state_norm, ssd_chunked
from hybrid_lm.kernels.ssd.reference import segment_index
from hybrid_lm.models.common.mixer import Layer, State, linear_flops
from hybrid_lm.models.mamba2 import backends
from hybrid_lm.models.mamba2.conv import causal_conv, conv_step, final_conv_state
from hybrid_lm.models.mamba2.norm import GatedRMSNorm


class Mamba2(Layer):
    stateful = True
    state_passing = True
    #: what ``train.state_passing: noise`` draws; the conv state holds past inputs and stays zero
    noise_state_keys = ("ssm",)

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 32,
        ngroups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        conv_bias: bool = True,
        bias: bool = False,
        norm_before_gate: bool = False,
        norm_eps: float = 1e-5,
        backend: str = "auto",
        dt_mult: float = 1.0,
        a_mult: float = 1.0,
        decay_mult: float = 1.0,
        b_mult: float = 1.0,
        state_norm_max: Optional[float] = None,
        state_window: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.A_init_range = A_init_range
        self.backend = backend
        # Stuffed Mamba's state-collapse knobs (kernels/ssd/README.md, Long context); plain attributes so an
        # evaluation can switch them on a trained model. Neutral values leave the layer bitwise as is.
        self.dt_mult, self.a_mult, self.decay_mult, self.b_mult = dt_mult, a_mult, decay_mult, b_mult
        self.state_norm_max, self.state_window = state_norm_max, state_window

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
            # stored in fp32 under bf16/fp16 training (as mamba_ssm keeps them): a bf16 A_log or
            # dt_bias moves the decay rates and time steps by up to 0.4% and small updates vanish
            p._keep_fp32 = True  # type: ignore[attr-defined]
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // ngroups, eps=norm_eps, norm_before_gate=norm_before_gate)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.out_proj.weight._is_residual_projection = True  # type: ignore[attr-defined]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As mamba_ssm: dt log-uniform in [dt_min, dt_max] stored as inverse softplus, A ~ U(range),
        D = 1, conv PyTorch default, norm weight 1. Linear layers are left to the stack."""
        dev = self.dt_bias.device
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.nheads, device=dev) * (hi - lo) + lo).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.empty(self.nheads, device=dev).uniform_(*self.A_init_range)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        self.conv1d.reset_parameters()
        self.norm.reset_parameters()

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> State:
        """conv (B, conv_dim, d_conv-1) zeros in ``dtype``; ssm (B, H, P, N) zeros in fp32; with
        ``state_window`` also the window's decode keys (``_window_keys``), all empty."""
        work = torch.promote_types(dtype, torch.float32)
        state = {
            "conv": torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=work),
        }
        if self.state_window is not None:
            state.update(self._empty_window(state["ssm"]))
        return state

    def _empty_window(self, ssm: torch.Tensor) -> State:
        """The window's decode keys before any token: ``ssm`` counts as written at position -1
        (as ``ssd_chunked``'s initial state), so it is the lagged state and every slot is empty.

        win_x (B, r, H, P) dt·x, win_b (B, r, G, N) B, win_logdecay (B, r, H) log a, win_valid
        (B, r) 1 for a written slot: the last r tokens' write factors, oldest first, and
        ``lag`` (B, H, P, N) the full state just before the oldest slot. The factors rather than
        the r states: r·(H·P + G·N + H) numbers against r·H·P·N."""
        batch, r = ssm.size(0), self.state_window
        assert r is not None
        return {
            "win_x": ssm.new_zeros(batch, r, self.nheads, self.headdim),
            "win_b": ssm.new_zeros(batch, r, self.ngroups, self.d_state),
            "win_logdecay": ssm.new_zeros(batch, r, self.nheads),
            "win_valid": ssm.new_zeros(batch, r),
            "lag": ssm.clone(),
        }

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xBC (..., conv_dim) -> x (..., H, P), B (..., G, N), C (..., G, N)."""
        gn = self.ngroups * self.d_state
        x, b, c = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        lead = xbc.shape[:-1]
        return (
            x.reshape(*lead, self.nheads, self.headdim),
            b.reshape(*lead, self.ngroups, self.d_state),
            c.reshape(*lead, self.ngroups, self.d_state),
        )

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        state: Optional[State] = None,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        """u (B, L, D) -> (B, L, D); ``state`` continues a previous call (first document only)."""
        batch, length, _ = x.shape
        z, xbc, dt_raw = torch.split(self.in_proj(x), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv_state = None if state is None else state["conv"]
        weight = self.conv1d.weight[:, 0]  # (conv_dim, K)
        if backends.use_conv_kernel(x, self.backend, conv_state is not None):  # pragma: no cover - CUDA
            seq_idx = None if doc_ids is None else backends.seq_idx_from_doc_ids(doc_ids)
            new_conv = None
            if return_state:
                zeros = xbc.new_zeros(batch, self.conv_dim, self.d_conv - 1)
                new_conv = final_conv_state(xbc, zeros, doc_ids)
            xbc = backends.causal_conv1d_fn(
                xbc.transpose(1, 2), weight, self.conv1d.bias, seq_idx=seq_idx, activation="silu"
            ).transpose(1, 2)
        else:
            xbc, new_conv = causal_conv(xbc, weight, self.conv1d.bias, conv_state, doc_ids)
            xbc = F.silu(xbc)
        xs, bm, cm = self._split_xbc(xbc)
        work = torch.promote_types(x.dtype, torch.float32)
        dt, A, bm = self._gates(dt_raw, bm, work)
        ssm_state = None if state is None else state["ssm"]
        plain = self.decay_mult == 1.0 and self.state_norm_max is None and self.state_window is None

        if plain and backends.use_mamba_kernels(x, self.backend):  # pragma: no cover - CUDA
            seq_idx = None if doc_ids is None else backends.seq_idx_from_doc_ids(doc_ids)
            out = backends.mamba_chunk_scan_combined(
                xs, dt, A, bm, cm, self.chunk_size, D=self.D.float(), initial_states=ssm_state,
                seq_idx=seq_idx, return_final_states=return_state,
            )
        else:
            out = ssd_chunked(
                xs, dt, A, bm, cm, self.chunk_size, D=self.D, initial_state=ssm_state,
                doc_ids=doc_ids, return_final_state=return_state, log_decay_bias=self._log_decay_bias(work, A.device),
                state_norm_max=self.state_norm_max, window=self.state_window,
            )
        y, final = (out if return_state else (out, None))
        if self.state_window is not None and state is not None and "lag" in state:
            y = self._ring_correction(y, cm, dt, A, state, doc_ids, work)
        y = self.norm(y.reshape(batch, length, self.d_inner), z)
        y = self.out_proj(y)
        if not return_state:
            return y, None
        new_state = {"conv": new_conv, "ssm": final}
        if self.state_window is not None:
            new_state.update(self._prefill_window(xs, dt, A, bm, state, doc_ids, work))
        return y, new_state

    def _ring_tokens(self, wx: torch.Tensor, wld: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ring slots as ``ssd_chunked`` inputs (x', dt') with dt'·x' = dt·x and dt'·A = log a.

        The scan takes x and dt apart (write dt·x·B, log decay dt·A + bias) while the ring keeps
        the products, so dt' = log a / A (the bias folded in; pass no ``log_decay_bias``) and
        x' = dt·x / dt'. An empty slot (log a = 0, dt·x = 0) becomes dt' = 0, x' = 0: decay 1 and no
        write, so the scan leaves the lagged state as the step does."""
        dtp = wld / A.to(wld.dtype)
        nonzero = dtp > 0
        xp = torch.where(nonzero[..., None], wx / torch.where(nonzero, dtp, 1.0)[..., None], 0.0)
        return xp, torch.where(nonzero, dtp, 0.0)

    def _window_keys(self, state: State, work: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(win_x, win_b, win_logdecay, win_valid, lag) of ``state`` in ``work``; a state without
        them (a ``noise`` state, one saved before the ring existed) counts its ``ssm`` as written
        at -1: an empty ring."""
        if "lag" not in state:
            state = self._empty_window(state["ssm"])
        return tuple(state[k].to(work) for k in ("win_x", "win_b", "win_logdecay", "win_valid", "lag"))

    def _ring_correction(self, y: torch.Tensor, cm: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                         state: State, doc_ids: Optional[torch.Tensor], work: torch.dtype) -> torch.Tensor:
        """The windowed forward continuing a state that carries the ring: y (B, L, H, P) with
        g_t·C_t·S_{t-r} also subtracted at t < r-1, where S_{t-r} (a ring position) came before
        this call. ``ssd_chunked`` counts the state as written at -1 and subtracts nothing there;
        with the ring, one forward over the concatenation is reproduced (the layer contract:
        chunked prefill, long-context evaluation in segments, a multi-token continuation from an
        exported model's cache). S_{t-r} is the state after ring slot t, so C_t·S_{t-r} is one
        scan over slots 0..m-1 from ``lag`` queried with the new tokens' C (no states stored);
        g_t = prod of the ring's log a over slots t+1..r-1 and the new ones over 0..t, zero while
        an empty slot is among t+1..r-1 or t is past the first document of this call."""
        r = self.state_window
        assert r is not None
        m = min(r - 1, y.size(1))
        if m <= 0:
            return y
        wx, wb, wld, wv, lag = self._window_keys(state, work)
        xp, dtp = self._ring_tokens(wx[:, :m], wld[:, :m], A)
        lagged = ssd_chunked(xp, dtp, A, wb[:, :m], cm[:, :m], self.chunk_size, initial_state=lag).to(work)
        log_decay = self._log_decays(dt[:, :m], A)
        # suffix sums / products over ring slots t+1..r-1, for t = 0..m-1
        ring_tail = wld.flip(1).cumsum(1).flip(1)[:, 1:m + 1]  # (B, m, H); m + 1 <= r
        full = wv.flip(1).cumprod(1).flip(1)[:, 1:m + 1]  # (B, m)
        gain = (ring_tail + log_decay.cumsum(1)).exp() * full[..., None]  # (B, m, H)
        if doc_ids is not None:
            seg = segment_index(doc_ids)
            gain = gain * (seg[:, :m] == seg[:, :1]).to(work)[..., None]
        head = (y[:, :m].to(work) - gain[..., None] * lagged).to(y.dtype)
        return torch.cat([head, y[:, m:]], dim=1)

    def _prefill_window(self, xs: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, bm: torch.Tensor,
                        state: Optional[State], doc_ids: Optional[torch.Tensor], work: torch.dtype) -> State:
        """The window's decode keys after a forward over L tokens: slots for positions L-r..L-1
        and ``lag`` = the full state at L-r-1. Positions before 0 come from ``state``'s ring (an
        empty one, ``ssm`` written at -1, when it has none or there is no state): the ring's last
        r-L slots stay and ``lag`` advances over its first L. Slots before the last document's
        start are emptied, and ``lag`` is zero when that document starts after L-r-1 (nothing of it
        came before)."""
        batch, length = xs.shape[:2]
        r = self.state_window
        assert r is not None
        if state is None:
            state = self.init_state(batch, device=xs.device, dtype=work)
        initial = state["ssm"].to(work)
        log_decay = self._log_decays(dt, A)
        seg = None if doc_ids is None else segment_index(doc_ids)
        same_doc_as_last = None if seg is None else (seg == seg[:, -1:]).to(work)  # (B, L)
        keep = xs.new_ones(batch, length, dtype=work) if same_doc_as_last is None else same_doc_as_last
        x_dt = dt[..., None] * xs.to(work)
        new = (x_dt, bm.to(work), log_decay, keep)
        before = length - r  # tokens before the oldest slot
        if before >= 0:
            keys = [t[:, before:] for t in new]
            if before == 0:
                lag = initial
            else:
                _, lag = ssd_chunked(
                    xs[:, :before], dt[:, :before], A, bm[:, :before], bm[:, :before], self.chunk_size,
                    initial_state=initial, doc_ids=None if doc_ids is None else doc_ids[:, :before],
                    return_final_state=True, log_decay_bias=self._log_decay_bias(work, xs.device))
            lag_kept = keep[:, max(before - 1, 0)]
        else:
            wx, wb, wld, wv, lag = self._window_keys(state, work)
            xp, dtp = self._ring_tokens(wx[:, :length], wld[:, :length], A)
            _, lag = ssd_chunked(xp, dtp, A, wb[:, :length], wb[:, :length], self.chunk_size,
                                 initial_state=lag, return_final_state=True)
            old = (wx[:, length:], wb[:, length:], wld[:, length:], wv[:, length:] * keep[:, :1])
            keys = [torch.cat([o, n], dim=1) for o, n in zip(old, new)]
            lag_kept = keep[:, 0]
        valid = keys[3]
        return {
            "win_x": keys[0] * valid[..., None, None],
            "win_b": keys[1] * valid[..., None, None],
            "win_logdecay": keys[2] * valid[..., None],
            "win_valid": valid,
            "lag": (lag.to(work) * lag_kept[:, None, None, None]),
        }

    def _gates(self, dt_raw: torch.Tensor, bm: torch.Tensor, work: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt (softplus'ed, times dt_mult), A (times a_mult) and B (times b_mult) in ``work`` dtype
        for dt; one place for the chunked and the step path, so the knobs act alike in both."""
        dt = F.softplus(dt_raw.to(work) + self.dt_bias.to(work))  # fp32 at least
        A = -torch.exp(self.A_log.to(work))
        if self.dt_mult != 1.0:
            dt = dt * self.dt_mult
        if self.a_mult != 1.0:
            A = A * self.a_mult
        if self.b_mult != 1.0:
            bm = bm * self.b_mult
        return dt, A, bm

    def _log_decay_bias(self, work: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        """log(decay_mult) per head (H,), or None when the decays are left alone."""
        if self.decay_mult == 1.0:
            return None
        return torch.full((self.nheads,), math.log(self.decay_mult), dtype=work, device=device)

    def _log_decays(self, dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """log a_t = dt·A (+ log decay_mult): what the scan decays by, for the paths that need it
        outside the scan (decode, the window's ring, the diagnostic)."""
        log_decay = dt * A
        bias = self._log_decay_bias(log_decay.dtype, log_decay.device)
        return log_decay if bias is None else log_decay + bias

    @torch.no_grad()
    def decays(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token decays a_t = exp(dt·A) (knobs included) of input x (B, L, D): (B, L, H) fp32+.
        A diagnostic (state collapse shows as heads with a_t near 1): it re-runs in_proj."""
        work = torch.promote_types(x.dtype, torch.float32)
        dt_raw = self.in_proj(x)[..., -self.nheads:]
        dt, A, _ = self._gates(dt_raw, dt_raw.new_zeros(()), work)
        return self._log_decays(dt, A).exp()

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        """Decode one token (as mamba_ssm's ``Mamba2.step``): u (B, D) -> y (B, D), updated conv and
        ssm states."""
        if state is None:
            state = self.init_state(x.size(0), device=x.device, dtype=x.dtype)
        z, xbc, dt_raw = torch.split(self.in_proj(x), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc, conv = conv_step(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, state["conv"])
        xs, bm, cm = self._split_xbc(F.silu(xbc))  # (B, H, P), (B, G, N), (B, G, N)
        rep = self.nheads // self.ngroups
        work = torch.promote_types(x.dtype, torch.float32)  # fp32 state even under bf16
        dt, A, bm = self._gates(dt_raw, bm, work)  # (B, H), (H,), (B, G, N)
        bh = bm.to(work).repeat_interleave(rep, dim=1)  # (B, H, N)
        ch = cm.to(work).repeat_interleave(rep, dim=1)
        log_decay = self._log_decays(dt, A)
        dA = torch.exp(log_decay)
        xf = xs.to(work)
        ssm = state["ssm"].to(work) * dA[..., None, None] + (dt[..., None] * xf)[..., None] * bh[:, :, None, :]
        window: State = {}
        if self.state_window is None:
            read = ssm
        else:
            read, window = self._window_step(state, ssm, dt[..., None] * xf, bm.to(work), log_decay, rep)
        y = torch.einsum("bhpn,bhn->bhp", read, ch) + self.D.to(work)[:, None] * xf
        if self.state_norm_max is not None:
            # the carried state is rescaled after the token's output is read, as the chunked form
            # rescales the state it carries over a chunk boundary (equal at chunk_size 1)
            ssm = clamp_state_norm(ssm, self.state_norm_max, dims=(-2, -1))
        y = self.norm(y.reshape(x.size(0), self.d_inner).to(x.dtype), z)
        return self.out_proj(y), {"conv": conv, "ssm": ssm, **window}

    def _window_step(self, state: State, ssm: torch.Tensor, x_dt: torch.Tensor, b: torch.Tensor,
                     log_decay: torch.Tensor, rep: int) -> tuple[torch.Tensor, State]:
        """One token of the windowed state: (S_t - g_t·S_{t-r}, the updated window keys).

        The oldest slot (position t-r) is folded into ``lag`` (S_{t-r-1} -> S_{t-r}), the gain
        g_t is the product of the decays at t-r+1..t, zero while any of those slots is empty (the
        initial state or an earlier document is still inside the window, so nothing leaves it)."""
        wx, wb, wld, wv, lag = self._window_keys(state, ssm.dtype)
        old_b = wb[:, 0].repeat_interleave(rep, dim=1)  # (B, H, N)
        advanced = lag * wld[:, 0].exp()[..., None, None] + wx[:, 0][..., None] * old_b[:, :, None, :]
        lag = torch.where(wv[:, 0].bool()[:, None, None, None], advanced, lag)
        gain = (wld[:, 1:].sum(1) + log_decay).exp() * wv[:, 1:].prod(1)[:, None]  # (B, H)
        window = {
            "win_x": torch.cat([wx[:, 1:], x_dt[:, None]], dim=1),
            "win_b": torch.cat([wb[:, 1:], b[:, None]], dim=1),
            "win_logdecay": torch.cat([wld[:, 1:], log_decay[:, None]], dim=1),
            "win_valid": torch.cat([wv[:, 1:], wv.new_ones(wv.size(0), 1)], dim=1),
            "lag": lag,
        }
        return ssm - gain[..., None, None] * lag, window

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, conv and the chunked scan as computed: Q x Q scores per group and their
        application per head (full blocks), plus chunk-state and state-output contractions."""
        d, di, h, p, n, g = self.d_model, self.d_inner, self.nheads, self.headdim, self.d_state, self.ngroups
        q = min(self.chunk_size, seq_len)
        proj = linear_flops(d, self.in_proj.out_features) + linear_flops(di, d)
        conv = 2.0 * self.conv_dim * self.d_conv
        scan = 2.0 * g * q * n + 2.0 * h * q * p + 2 * 2.0 * h * p * n
        return proj + conv + scan

    def extra_repr(self) -> str:
        knobs = {k: getattr(self, k) for k in ("dt_mult", "a_mult", "decay_mult", "b_mult")}
        extra = "".join(f", {k}={v}" for k, v in knobs.items() if v != 1.0)
        extra += "".join(f", {k}={getattr(self, k)}" for k in ("state_norm_max", "state_window")
                         if getattr(self, k) is not None)
        return (f"heads={self.nheads}, headdim={self.headdim}, d_state={self.d_state}, "
                f"ngroups={self.ngroups}, chunk={self.chunk_size}{extra}")
