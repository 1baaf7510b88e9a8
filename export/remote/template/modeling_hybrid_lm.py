"""Hugging Face wrapper around the vendored hybrid-lm model (remote code, no hybrid_lm import).

Every other ``.py`` file in this folder is hybrid-lm's own model source, copied at export time with
its imports rewritten to relative ones (``vendored_files.py`` lists them so that transformers copies
them all into its module cache). ``HybridLMForCausalLM.model`` is the very ``HybridLM`` that
trained, so logits are bit-identical to hybrid-lm's.

Generation uses the same per-layer states as ``HybridLM.generate`` (attention KV cache, Mamba-2
conv/SSM state, Titans/ATLAS memory, ...), carried between ``generate`` steps by
``HybridLMCache``, a transformers ``Cache`` that holds them: the prompt runs once through the
parallel form with ``return_states``, then every step feeds only the new token to
``HybridLM.step`` (O(1) per token for recurrent layers, O(T) for attention, instead of re-running
the whole prefix). ``use_cache=False`` gives the uncached path (the whole prefix each step). The
states are not key/value tensors, so transformers' own caches (DynamicCache, static caches) do
not apply; they cannot be cropped either, so assisted decoding is unavailable. Beam search works
(``reorder_cache``: every state tensor is batch-first).

Padding: an ``attention_mask`` with zeros becomes ``doc_ids`` (pads and real tokens are different
documents, so every stateful layer restarts at the first real token) and ``position_ids`` counting
real tokens from 0. The layer contract makes that exact for left padding, and the states after the
prompt are those of its last document, the real tokens, so cached decoding continues them; right
padding is harmless for a causal model without a cache.

An HMT model (``model.hmt``, hybrid-lm's ``models/hmt/``) is the same class around ``HMTLM``: its
cache holds ``HMTLM.prefill``'s decode state (memory cache, sensory memory, the open segment and
the backbone states), each new token goes through ``HMTLM.decode``, so ``generate`` equals
``HMTLM.generate``; a padded prompt is refused for cached HMT generation.
"""
from typing import Any, Optional

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hybrid_lm import HybridLMConfig
from .models_config import ModelConfig
from .models_kinds import build_lm, tied_keys
from .typed_config import from_dict
from .vendored_files import __name__ as _vendored_files  # noqa: F401  (makes transformers copy them)

# transformers 5.x renamed the output field (and forward argument) past_key_values -> cache
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _map_states(states: Any, fn) -> Any:
    """``fn`` applied to every tensor of the per-layer states (dicts of batch-first tensors, or None)."""
    if isinstance(states, torch.Tensor):
        return fn(states)
    if isinstance(states, dict):
        return {k: _map_states(v, fn) for k, v in states.items()}
    if isinstance(states, (list, tuple)):
        return type(states)(_map_states(v, fn) for v in states)
    return states


class HybridLMCache(Cache):
    """``HybridLM``'s per-layer states after ``seen`` tokens, as a transformers cache object."""

    def __init__(self, states: Optional[list] = None, seen: int = 0) -> None:
        super().__init__(layers=[])
        self.states, self.seen = states, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot be rolled back to an earlier token

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("HybridLMCache holds recurrent states, which cannot be cropped")

    def reset(self) -> None:
        self.states, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states = _map_states(self.states, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.states = _map_states(self.states, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = _map_states(self.states, lambda t: t[indices])


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridLMConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _is_stateful = True  # the states cannot be cropped: older transformers refuse assisted decoding on this

    def __init__(self, config: HybridLMConfig) -> None:
        super().__init__(config)
        model_config = from_dict(ModelConfig, config.hybrid_lm, "model")
        self.model = build_lm(model_config)
        embed, head = tied_keys(model_config)
        self._tied_weights_keys = {f"model.{head}": f"model.{embed}"}
        self.post_init()

    @property
    def _stack(self):
        """The pattern stack holding the embedding and head (an HMT model's backbone)."""
        return getattr(self.model, "backbone", self.model)

    @property
    def _is_hmt(self) -> bool:
        return hasattr(self.model, "prefill")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not hand forward a DynamicCache: forward builds its own HybridLMCache
        return False

    def _init_weights(self, module):
        # Weights come from the checkpoint; HybridLM's own init already ran in its constructor.
        pass

    def get_input_embeddings(self):
        return self._stack.embed

    def set_input_embeddings(self, value):
        self._stack.embed = value

    def get_output_embeddings(self):
        return self._stack.lm_head

    def set_output_embeddings(self, value):
        self._stack.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None, use_cache=None,
                                      next_sequence_length=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if isinstance(cache, HybridLMCache) and cache.states is not None:
            # only the tokens the states have not seen (one per step while decoding)
            new = next_sequence_length if next_sequence_length is not None else input_ids.shape[1] - cache.seen
            input_ids = input_ids[:, -new:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        use_cache: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, t) -> logits (B, t, V). With a ``HybridLMCache`` holding states, input_ids
        are the t tokens after the ``cache.seen`` it has consumed (t = 1: one ``HybridLM.step``)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, HybridLMCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"HybridLMForCausalLM carries its layers' states in a HybridLMCache, not a "
                                 f"{type(cache).__name__}")
            cache = None  # an empty cache object of another kind: start ours instead
        # a plain call builds no states unless asked; generate always says (use_cache, default True)
        use_cache = use_cache if use_cache is not None else cache is not None
        if cache is not None and cache.states is not None:
            logits, states = self._continue(input_ids, attention_mask, cache.states)
        else:
            doc_ids = position_ids = None
            if attention_mask is not None and not bool(attention_mask.all()):
                mask = attention_mask.long()
                doc_ids = mask
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            hmt = self._is_hmt
            out = self.model(input_ids, doc_ids=doc_ids, position_ids=position_ids, return_states=use_cache and not hmt)
            logits, states = out.logits, out.states
            if use_cache and hmt:
                if doc_ids is not None:
                    raise ValueError("cached generation of an HMT model does not take a padded prompt")
                last, states = self.model.prefill(input_ids)
                logits = torch.cat([logits[:, :-1], last[:, None].to(logits.dtype)], 1)
        if use_cache:
            seen = cache.seen if cache is not None and cache.states is not None else 0
            if cache is None:
                cache = HybridLMCache()
            cache.states, cache.seen = states, seen + input_ids.shape[1]
        loss = None
        if labels is not None:
            # transformers convention: labels are the inputs, shifted here
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    def _continue(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  states: list) -> tuple[torch.Tensor, list]:
        """Logits (B, t, V) of the t new tokens after ``states``, and the states after them."""
        t = input_ids.shape[1]
        if attention_mask is not None and not bool(attention_mask[:, -t:].all()):
            raise ValueError("padding after the cached tokens is not supported: pad on the left of the prompt")
        if self._is_hmt:
            logits = []
            for i in range(t):
                step_logits, states = self.model.decode(input_ids[:, i], states)
                logits.append(step_logits)
            return torch.stack(logits, 1), states
        if t == 1:
            logits, states = self.model.step(input_ids[:, 0], states)
            return logits[:, None], states
        out = self.model(input_ids, states=states, return_states=True)
        return out.logits, out.states
