"""The remote-code export: for layer families transformers has no class for (Titans, ATLAS, ...).

The output folder carries its own model code: hybrid-lm's model source vendored by ``vendor.py``
plus the two fixed files in ``template/`` (a ``PretrainedConfig`` holding the ModelConfig dict and
a ``PreTrainedModel`` + ``GenerationMixin`` wrapping ``HybridLM``). ``config.json`` names them in
``auto_map``, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works on a
machine with only torch and transformers. A new family needs nothing here: its registered builder's
module is found through the registry and vendored with everything it imports.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from hybrid_lm.export.native import Adapter
from hybrid_lm.export.remote.vendor import vendor
from hybrid_lm.export.weights import cast, save_sharded
from hybrid_lm.models.common.registry import get_layer_spec
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.kinds import tied_keys
from hybrid_lm.models.model_dir import SpecialIds
from hybrid_lm.typed_config import to_dict

TEMPLATE = Path(__file__).parent / "template"
CORE_MODULES = ["hybrid_lm.models.config", "hybrid_lm.models.hybrid", "hybrid_lm.models.kinds",
                "hybrid_lm.models.common.mixer", "hybrid_lm.models.common.registry", "hybrid_lm.typed_config"]
PREFIX = "model."


def family_modules(config: ModelConfig) -> list[str]:
    """The modules whose import registers the letters of ``config.layer_pattern``: the builder's own
    module and its package (whose ``__init__`` is what the registry imports)."""
    modules: set[str] = set()
    for letter in sorted(set(config.layer_pattern)):
        module = get_layer_spec(letter).build.__module__
        modules.add(module)
        package = module.rsplit(".", 1)[0]
        if package.startswith("hybrid_lm.models.") and package != "hybrid_lm.models.common":
            modules.add(package)
    return sorted(modules)


def write_remote(out_dir: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
                 dtype: torch.dtype, max_shard_size: int | str, special_ids: SpecialIds) -> None:
    """Code, ``config.json`` and weights of a remote-code export into ``out_dir`` (existing, empty)."""
    out_dir = Path(out_dir)
    stems = vendor(CORE_MODULES + family_modules(config), out_dir)
    lines = ['"""Names every vendored hybrid-lm file so transformers copies them with the model code."""']
    lines += [f"from .{stem} import __name__ as _{stem}  # noqa: F401" for stem in stems]
    (out_dir / "vendored_files.py").write_text("\n".join(lines) + "\n")
    shutil.copyfile(TEMPLATE / "modeling_hybrid_lm.py", out_dir / "modeling_hybrid_lm.py")
    # transformers keeps one config class per content of this file and, once a model class is
    # registered for it, reuses that class for every later folder with the same config file: two
    # exports with different layer families in one process would build the second with the first
    # one's code. A fingerprint of the model code makes the file differ exactly when the code does.
    code = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(out_dir.glob("*.py"))))
    (out_dir / "configuration_hybrid_lm.py").write_text(
        (TEMPLATE / "configuration_hybrid_lm.py").read_text() + f"\n# model code sha256: {code.hexdigest()}\n")

    weights = {PREFIX + k: v for k, v in state_dict.items()}
    if config.tie_embeddings:
        weights.pop(PREFIX + tied_keys(config)[1], None)
    save_sharded(cast(weights, dtype), out_dir, max_shard_size)

    hf_config = {
        "architectures": ["HybridLMForCausalLM"],
        "model_type": "hybrid_lm",
        "auto_map": {"AutoConfig": "configuration_hybrid_lm.HybridLMConfig",
                     "AutoModelForCausalLM": "modeling_hybrid_lm.HybridLMForCausalLM"},
        "hybrid_lm": portable_config_dict(config),
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_blocks,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        **special_ids,
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def portable_config_dict(config: ModelConfig) -> dict:
    """The model config as the export records it, with kernel choices reset to ``auto``: a backend
    forced on the training machine (flash-attn, mamba_ssm) is a property of that machine, not of
    the model, and would make the export refuse to run where the kernel is not installed."""
    data = to_dict(config)
    for section in ("attention", "mamba2"):
        data[section]["backend"] = "auto"
    return data


class RemoteAdapter(Adapter):
    """Adapter-table entry for the remote-code path (see ``hybrid_lm.export.adapters``)."""

    name = "remote"
    hf_class = "HybridLMForCausalLM (remote code)"

    def unsupported(self, config: ModelConfig) -> str | None:
        try:
            family_modules(config)
        except KeyError as exc:
            return str(exc)
        return None

    def write(self, out_dir: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
              dtype: torch.dtype, max_shard_size: int | str, special_ids: SpecialIds) -> None:
        write_remote(out_dir, config, state_dict, dtype=dtype, max_shard_size=max_shard_size,
                     special_ids=special_ids)
