"""``HMTLM``: the hierarchical memory transformer (arXiv 2405.06067) around any pattern stack.

The backbone is a ``HybridLM`` built from the same ``ModelConfig`` (``model.hmt`` removed), so every
layer letter works as a backbone and its weights keep their names under ``backbone.``. The mechanism
follows the official HMT-pytorch code. A row is cut into *documents* (``doc_ids``), each document
into segments of ``L = hmt.text_length`` text tokens, and segment n of a document runs:

1. representation extraction: ``S = BBM([T ; E(X[:j]) ; T])[-1]`` with ``j = round(len(X) * fraction)``;
2. memory search: ``P = softmax(S Wq (C Wk)^T / sqrt(h)) C`` over the cache ``C`` (N', D) of earlier
   memory embeddings, in fp32, no value projection; ``P = m_init`` while the cache is empty;
3. the main pass ``BBM([P ; E(sensory) ; E(X) ; P])`` at positions 0.., with the sensory tokens (the
   last k tokens of segment n-1) left out for a document's first segment;
4. logits of the text tokens only, and ``m_n`` = the last position's hidden state, appended to the
   cache (FIFO of ``cache_size``); the last k token embeddings become the next sensory memory.

"BBM(...)" is the backbone's blocks and final norm on embeddings (``HybridLM.hidden_states``);
hidden states are final-normed, as Hugging Face's last hidden state is. Documents never see each
other: each starts with an empty cache, no sensory memory and fresh backbone states, whatever else
the row holds, so a packed row gives what each document gives alone. ``position_ids`` are ignored
(positions restart in every backbone pass). As in the reference, the summary of the first j tokens
of a segment selects the recall weights used by all its tokens, so a token's logits depend (through
those N' weights only, never through their values) on up to j tokens after it once the cache holds
two or more entries.

State across calls (``return_states=True`` -> ``HMTState``): per row, the cache, the sensory
embeddings and (``carry_backbone_state``) the backbone states of its last document; the next call's
first document continues them. Every call closes its last segment (writes its memory), so calls
that cut each document at segment boundaries equal one call over the whole row.

Gradients (``bptt_depth = D``): segments n = 0, D, 2D, ... of a document detach everything carried
into them, so no loss reaches more than D segments back; a call detaches what it is handed.

Shapes: ``input_ids`` (B, T) -> ``logits`` (B, T, V). Streams of equal input length are batched
into one backbone call per segment index.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.models.attention.layer import Attention
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hmt.config import HMTConfig
from hybrid_lm.models.hybrid import HybridLM, ModelOutput, States, rng_devices


#: what ``HMTLM.decode`` continues from: cache (B, n, D), sensory (B, k', D), the open segment's
#: text embeddings (B, l, D), its memory token (B, D) and the backbone states (batch-first tensors
#: only, so a transformers cache can reorder or repeat them)
DecodeState = dict[str, Any]


@dataclass
class HMTState:
    """What the next call continues from, one entry per row (its last document)."""

    cache: list[torch.Tensor]
    """(n, D), n <= cache_size: the memory embeddings, oldest first"""
    sensory: list[torch.Tensor]
    """(k', D), k' <= sensory_tokens: the last token embeddings of the previous segment"""
    backbone: list[Optional[States]]
    """batch-1 states of the carried backbone layers (``carry_backbone_state``), else None"""

    def detach(self) -> "HMTState":
        return HMTState([c.detach() for c in self.cache], [s.detach() for s in self.sensory],
                        [_detach_states(s) for s in self.backbone])


def _detach_states(states: Optional[States]) -> Optional[States]:
    if states is None:
        return None
    return [None if s is None else {k: v.detach() for k, v in s.items()} for s in states]


@dataclass
class _Stream:
    """One document of one row while a call runs."""

    row: int
    start: int
    end: int
    cache: torch.Tensor
    sensory: torch.Tensor
    states: Optional[States]
    hidden: list[torch.Tensor] = field(default_factory=list)
    """(len, D) hidden states of each segment's text tokens, in order"""

    def segment(self, n: int, length: int) -> Optional[tuple[int, int]]:
        s = self.start + n * length
        return (s, min(s + length, self.end)) if s < self.end else None


def backbone_config(config: ModelConfig) -> ModelConfig:
    """The config of the pattern stack inside an HMT model (the same, without ``hmt``)."""
    return dataclasses.replace(config, hmt=None)


class HMTLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hmt is None:
            raise ValueError("HMTLM needs a config with an hmt section")
        self.config = config
        self.hmt: HMTConfig = config.hmt
        d = config.d_model
        h = self.hmt.recall_hidden_size or d
        # constructor inits (the backbone's own, nn.Linear's) draw from a forked RNG and are all
        # overwritten by init_weights, so the weights depend only on the RNG state at the call, and
        # a model built on the meta device and materialised later (train/meta_init.py) gets the same
        with torch.random.fork_rng(devices=rng_devices()):
            self.backbone = HybridLM(backbone_config(config))
            self.summary_prompt = nn.Parameter(torch.empty(d))
            self.memory_init = nn.Parameter(torch.empty(d))
            self.recall_q = nn.Linear(d, h, bias=False)
            self.recall_k = nn.Linear(d, h, bias=False)
        # which backbone state entries travel between segments: the stateful non-attention layers
        # (a looped stack has one state per block and loop, entry loop * n_blocks + block)
        per_block = [not isinstance(b.layer, Attention) and b.layer.stateful for b in self.backbone.blocks]
        self._carried = per_block * getattr(self.backbone, "loops", 1)
        if not self.summary_prompt.is_meta:
            self.init_weights()
        if self.hmt.freeze_backbone:
            self.backbone.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The backbone's own init; T and m_init ~ N(0, init_std^2), the embedding's std at init (the
        reference draws them with the loaded embedding's std); recall projections as nn.Linear."""
        self.backbone.init_weights()
        self.init_memory_weights()

    @torch.no_grad()
    def init_memory_weights(self) -> None:
        """HMT's own parameters, drawn after the backbone's (``init_weights``' second half)."""
        nn.init.normal_(self.summary_prompt, std=self.config.init_std)
        nn.init.normal_(self.memory_init, std=self.config.init_std)
        self.recall_q.reset_parameters()
        self.recall_k.reset_parameters()

    @property
    def carries_backbone_state(self) -> bool:
        return self.hmt.carry_backbone_state and any(self._carried)

    # -- pieces of one segment --------------------------------------------------------------

    def _run(self, inputs: list[torch.Tensor], states: Optional[list[Optional[States]]] = None
             ) -> tuple[list[torch.Tensor], list[Optional[States]]]:
        """The backbone on each (L_i, D) input embedding sequence -> final-normed hidden (L_i, D) and,
        when ``states`` is given, each one's new carried states. Equal lengths share one call."""
        out_h: list[Optional[torch.Tensor]] = [None] * len(inputs)
        out_s: list[Optional[States]] = [None] * len(inputs)
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x.shape[0], []).append(i)
        for length, idx in groups.items():
            x = torch.stack([inputs[i] for i in idx])
            pos = torch.arange(length, device=x.device).expand(len(idx), length)
            batch_states = None if states is None else self._stack_states([states[i] for i in idx], x)
            hidden, new = self.backbone.hidden_states(x, position_ids=pos, states=batch_states,
                                                      return_states=states is not None)
            for j, i in enumerate(idx):
                out_h[i] = hidden[j]
                if states is not None:
                    out_s[i] = [None if not keep or s is None else {k: v[j:j + 1] for k, v in s.items()}
                                for s, keep in zip(new, self._carried)]
        return out_h, out_s  # type: ignore[return-value]

    def _stack_states(self, per_stream: list[Optional[States]], x: torch.Tensor) -> States:
        fresh = None
        rows: list[States] = []
        for s in per_stream:
            if s is None:
                fresh = fresh or self.backbone.init_states(1, device=x.device, dtype=x.dtype)
                s = fresh
            rows.append(s)
        stacked: States = []
        for i, keep in enumerate(self._carried):
            if not keep or rows[0][i] is None:
                stacked.append(None)
            else:
                stacked.append({k: torch.cat([r[i][k] for r in rows]) for k in rows[0][i]})
        return stacked

    def recall(self, summary: torch.Tensor, cache: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Memory search. summary (A, D), cache (A, N, D) (zeros where ``valid`` (A, N) is False) ->
        the recalled embedding (A, D): a convex combination of the cached embeddings, weights in fp32."""
        acc = torch.promote_types(cache.dtype, torch.float32)  # at least fp32 (fp64 stays fp64)
        q = self.recall_q(summary).to(acc)
        k = self.recall_k(cache).to(acc)
        scores = torch.einsum("ah,anh->an", q, k) / math.sqrt(q.shape[-1])
        weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        return torch.einsum("an,and->ad", weights, cache.to(acc)).to(cache.dtype)

    def memory_tokens(self, streams: list[_Stream], texts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The memory token P (D,) of each stream's next segment, given its text embeddings (L_i, D)."""
        tokens: list[Optional[torch.Tensor]] = [None] * len(streams)
        searching = []
        for i, s in enumerate(streams):
            if s.cache.shape[0] == 0:
                tokens[i] = self.memory_init
            elif not self.hmt.memory_search:
                tokens[i] = s.cache[-1]  # stage 1: RMT, the previous memory embedding
            else:
                searching.append(i)
        if searching:
            t = self.summary_prompt[None]
            inputs = [torch.cat([t, texts[i][: self.hmt.summary_length(texts[i].shape[0])], t]) for i in searching]
            summaries, _ = self._run(inputs)
            caches = [streams[i].cache for i in searching]
            n = max(c.shape[0] for c in caches)
            padded = torch.stack([F.pad(c, (0, 0, 0, n - c.shape[0])) for c in caches])
            valid = torch.arange(n, device=padded.device)[None] < torch.tensor([c.shape[0] for c in caches],
                                                                                device=padded.device)[:, None]
            recalled = self.recall(torch.stack([h[-1] for h in summaries]), padded, valid)
            for j, i in enumerate(searching):
                tokens[i] = recalled[j]
        return tokens  # type: ignore[return-value]

    # -- the model ----------------------------------------------------------------------------

    def _streams(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor], state: Optional[HMTState],
                 emb: torch.Tensor) -> list[_Stream]:
        b, t = input_ids.shape
        empty = emb.new_zeros(0, emb.shape[-1])
        if doc_ids is None:
            starts = [[0] for _ in range(b)]
        else:
            change = (doc_ids[:, 1:] != doc_ids[:, :-1]).cpu()
            starts = [[0] + (torch.nonzero(change[r])[:, 0] + 1).tolist() for r in range(b)]
        streams = []
        for r in range(b):
            bounds = starts[r] + [t]
            for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                carried = state is not None and i == 0
                streams.append(_Stream(r, s, e, state.cache[r] if carried else empty,
                                       state.sensory[r] if carried else empty,
                                       state.backbone[r] if carried else None))
        return streams

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        states: Optional[HMTState] = None,
        return_states: bool = False,
    ) -> ModelOutput:
        """``HybridLM``'s call: input_ids (B, T) -> logits (B, T, V), loss over labels != -100, and
        with ``return_states`` the ``HMTState`` the next call continues from."""
        del position_ids  # every backbone pass numbers its own positions from 0
        hmt = self.hmt
        emb = self.backbone.embed(input_ids)
        streams = self._streams(input_ids, doc_ids, states, emb)
        carry = self.carries_backbone_state
        n = 0
        while True:
            active = [(s, seg) for s in streams if (seg := s.segment(n, hmt.text_length)) is not None]
            if not active:
                break
            if n % hmt.bptt_depth == 0:  # truncated BPTT: this segment starts a new gradient window
                for s, _ in active:
                    s.cache, s.sensory, s.states = s.cache.detach(), s.sensory.detach(), _detach_states(s.states)
            texts = [emb[s.row, a:b] for s, (a, b) in active]
            memory = self.memory_tokens([s for s, _ in active], texts)
            inputs = [torch.cat([p[None], s.sensory, x, p[None]]) for (s, _), p, x in zip(active, memory, texts)]
            hidden, new_states = self._run(inputs, [s.states for s, _ in active] if carry else None)
            for (s, _), h, x, st in zip(active, hidden, texts, new_states):
                k = s.sensory.shape[0]
                s.hidden.append(h[1 + k: 1 + k + x.shape[0]])
                s.cache = torch.cat([s.cache, h[-1:]])[-hmt.cache_size:]
                s.sensory = x[max(0, x.shape[0] - hmt.sensory_tokens):]
                s.states = st if carry else None
            n += 1
        rows: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
        for s in streams:
            rows[s.row].extend(s.hidden)
        hidden_all = torch.stack([torch.cat(r) for r in rows])
        logits = self.backbone.lm_head(hidden_all)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        new_state = None
        if return_states:
            last = {s.row: s for s in streams}
            new_state = HMTState([last[r].cache for r in range(len(rows))], [last[r].sensory for r in range(len(rows))],
                                 [last[r].states for r in range(len(rows))])
        return ModelOutput(logits=logits, loss=loss, states=new_state)  # type: ignore[arg-type]

    # -- generation ---------------------------------------------------------------------------

    def _open_segment(self, text: torch.Tensor, cache: torch.Tensor, sensory: torch.Tensor,
                      states: Optional[States]) -> tuple[torch.Tensor, torch.Tensor, States]:
        """Start decoding a segment whose first tokens' embeddings are ``text`` (B, l, D), after
        ``cache`` (B, n, D) and ``sensory`` (B, k', D): the memory token P (B, D) from the tokens
        present, then the main pass [P ; sensory ; text] -> (logits at the last token (B, V), P,
        backbone states to decode on)."""
        rows = range(text.shape[0])
        streams = [_Stream(r, 0, 0, cache[r], sensory[r], None) for r in rows]
        p = torch.stack(self.memory_tokens(streams, [text[r] for r in rows]))
        x = torch.cat([p[:, None], sensory, text], 1)
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        hidden, new_states = self.backbone.hidden_states(x, position_ids=pos, states=states, return_states=True)
        return self.backbone.lm_head(hidden[:, -1]), p, new_states

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """input_ids (B, T >= 1) -> (logits of the next token (B, V), the state ``decode`` continues).

        The prompt's complete segments run through ``forward`` (cache and sensory memory); the
        segment holding its last token stays open: its memory token is recalled from the tokens it
        has when it opens (so these logits are ``forward``'s at the last prompt token), and the
        backbone decodes on from its states."""
        t = input_ids.shape[1]
        closed = (t - 1) // self.hmt.text_length * self.hmt.text_length
        empty = self.backbone.embed.weight.new_zeros(input_ids.shape[0], 0, self.config.d_model)
        cache, sensory, carried = empty, empty, None
        if closed:
            state: HMTState = self(input_ids[:, :closed], return_states=True).states  # type: ignore[assignment]
            cache, sensory = torch.stack(state.cache), torch.stack(state.sensory)
            if self.carries_backbone_state:
                carried = self._stack_states(state.backbone, cache)
        text = self.backbone.embed(input_ids[:, closed:])
        logits, memory, states = self._open_segment(text, cache, sensory, carried)
        return logits, {"cache": cache, "sensory": sensory, "text": text, "memory": memory, "states": states}

    @torch.no_grad()
    def decode(self, next_ids: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """One token (B,) after ``state`` -> (logits of the next one (B, V), the new state). A full
        open segment is first closed by stepping its trailing memory token, whose hidden state enters
        the cache; the token then opens a new segment (the reference's generation loop)."""
        hmt = self.hmt
        cache, sensory, text, memory, states = (state[k] for k in ("cache", "sensory", "text", "memory", "states"))
        new = self.backbone.embed(next_ids)[:, None]
        if text.shape[1] < hmt.text_length:
            logits, states = self.backbone.step(next_ids, states)
            return logits, {**state, "text": torch.cat([text, new], 1), "states": states}
        last, states = self.backbone.step_hidden(memory, states)
        cache = torch.cat([cache, last[:, None]], 1)[:, -hmt.cache_size:]
        sensory = text[:, text.shape[1] - hmt.sensory_tokens:] if hmt.sensory_tokens else text[:, :0]
        carried = [s if keep else None for s, keep in zip(states, self._carried)] if self.carries_backbone_state else None
        logits, memory, states = self._open_segment(new, cache, sensory, carried)
        return logits, {"cache": cache, "sensory": sensory, "text": new, "memory": memory, "states": states}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``prefill``, then ``decode`` token by token; greedy when temperature == 0.
        input_ids (B, T >= 1) -> (B, T + max_new_tokens)."""
        logits, state = self.prefill(input_ids)
        tokens = [input_ids]
        for i in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(dim=-1)
            tokens.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits, state = self.decode(nxt, state)
        return torch.cat(tokens, dim=1)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per text token: the main pass over ``segment_length`` positions and the summary
        pass over j + 2 per ``text_length`` tokens, at the backbone's per-token cost for that length,
        plus the head and the memory search (cache_size keys). ``seq_len`` does not matter: the
        backbone never sees more than one segment."""
        hmt, d, v = self.hmt, self.config.d_model, self.config.vocab_size
        head = 2.0 * d * v
        blocks = self.backbone.flops_per_token(hmt.segment_length) - head
        j = hmt.summary_length(hmt.text_length)
        h = self.hmt.recall_hidden_size or d
        recall = 2.0 * d * h * (1 + hmt.cache_size) + 2.0 * hmt.cache_size * (h + d)
        return blocks * (hmt.segment_length + j + 2) / hmt.text_length + head + recall / hmt.text_length

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.backbone.embed.weight.numel()
        return n

