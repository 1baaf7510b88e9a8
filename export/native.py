"""The adapter interface and the writer every native target shares.

Each native adapter (``llama.py``, ``mamba2.py``, ``bamba.py``) says whether it can represent a
``ModelConfig`` *exactly* (``unsupported`` returns the reason when not), builds the transformers
config, and renames tensors. ``write`` is shared: the HF model is built on the meta device, the
renamed tensors are assigned strictly (a missing or unexpected name fails here, not at load time)
and transformers' own ``save_pretrained`` writes config and (sharded) safetensors. The table that
chooses among the adapters is ``adapters.py``, which imports them all; this module imports none.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.model_dir import ExportError, SpecialIds


class Adapter:
    name: str = ""
    hf_class: str = ""
    """class name in ``transformers`` (native adapters)"""

    def unsupported(self, config: ModelConfig) -> Optional[str]:
        """None when this target represents ``config`` exactly, else why not."""
        raise NotImplementedError

    def write(self, out_dir: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
              dtype: torch.dtype, max_shard_size: int | str, special_ids: SpecialIds) -> None:
        raise NotImplementedError


class NativeAdapter(Adapter):
    def hf_config(self, config: ModelConfig, special_ids: SpecialIds):
        raise NotImplementedError

    def to_hf(self, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build_hf_model(self, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                       special_ids: SpecialIds, dtype: torch.dtype = torch.float32):
        import transformers

        hf_config = self.hf_config(config, special_ids)
        hf_state = self.to_hf(config, state_dict)
        if config.tie_embeddings:
            hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
        with torch.device("meta"):
            model = getattr(transformers, self.hf_class)(hf_config)
        expected = set(model.state_dict())
        if config.tie_embeddings:
            expected.discard("lm_head.weight")
        missing, unexpected = sorted(expected - set(hf_state)), sorted(set(hf_state) - expected)
        if missing or unexpected:
            raise ExportError(f"{self.hf_class}: renamed weights do not fit; missing {missing}, unexpected {unexpected}")
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).clone() for k, v in hf_state.items()}
        model.load_state_dict(tensors, strict=False, assign=True)
        if config.tie_embeddings:
            model.tie_weights()
        # non-persistent buffers (RoPE inv_freq) stay on meta: save_pretrained does not write them
        # and from_pretrained recomputes them, so this model is for saving only
        model.config.dtype = dtype
        return model.eval()

    def write(self, out_dir: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
              dtype: torch.dtype, max_shard_size: int | str, special_ids: SpecialIds) -> None:
        model = self.build_hf_model(config, state_dict, special_ids, dtype)
        model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
