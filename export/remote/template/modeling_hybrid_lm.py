"""Hugging Face wrapper around the vendored hybrid-lm model (remote code, no hybrid_lm import).

Every other ``.py`` file in this folder is hybrid-lm's own model source, copied at export time with
its imports rewritten to relative ones (``vendored_files.py`` lists them so that transformers copies
them all into its module cache). ``HybridLMForCausalLM.model`` is the very ``HybridLM`` that
trained, so logits are bit-identical to hybrid-lm's.

Generation: ``generate`` works without a KV/state cache: every step re-runs the whole prefix
through the parallel form. That is O(T^2) per sequence but exact and family-agnostic (recurrent
Titans/Mamba states do not fit transformers' Cache classes).

Padding: an ``attention_mask`` with zeros becomes ``doc_ids`` (pads and real tokens are different
documents, so every stateful layer restarts at the first real token) and ``position_ids`` counting
real tokens from 0. The layer contract makes that exact for left padding; right padding is
harmless for a causal model.
"""
from typing import Optional

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hybrid_lm import HybridLMConfig
from .models_config import ModelConfig
from .models_hybrid import HybridLM
from .typed_config import from_dict
from .vendored_files import __name__ as _vendored_files  # noqa: F401  (makes transformers copy them)


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridLMConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _supports_cache_class = False
    _is_stateful = True  # no cache to crop or reorder: disables assisted/contrastive decoding

    def __init__(self, config: HybridLMConfig) -> None:
        super().__init__(config)
        self.model = HybridLM(from_dict(ModelConfig, config.hybrid_lm, "model"))
        self.post_init()

    def _init_weights(self, module):
        # Weights come from the checkpoint; HybridLM's own init already ran in its constructor.
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        doc_ids = position_ids = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.long()
            doc_ids = mask
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids, doc_ids=doc_ids, position_ids=position_ids).logits
        loss = None
        if labels is not None:
            # transformers convention: labels are the inputs, shifted here
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
