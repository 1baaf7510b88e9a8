"""train.init_from accepts a model-only dir (what ``hybrid-lm import`` writes), read through
models/model_dir.py: the built model carries the saved weights, not its seeded init."""
import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.model_dir import save_model_dir
from hybrid_lm.train.build import build_model
from hybrid_lm.typed_config import from_dict


def test_init_from_a_model_only_dir_loads_its_weights(tmp_path):
    config = from_dict(ModelConfig, {"vocab_size": 64, "d_model": 16, "layer_pattern": "A-",
                                     "attention": {"n_heads": 2}, "mlp": {"hidden_size": 32}}, "model")
    torch.manual_seed(123)
    source = HybridLM(config)
    save_model_dir(tmp_path / "init", config, source.state_dict())
    fresh = build_model(config, seed=0, init_from=None, resuming=False)
    loaded = build_model(config, seed=0, init_from=str(tmp_path / "init"), resuming=False)
    names = list(source.state_dict())
    assert any(not torch.equal(fresh.state_dict()[k], source.state_dict()[k]) for k in names)
    assert all(torch.equal(loaded.state_dict()[k], source.state_dict()[k]) for k in names)
