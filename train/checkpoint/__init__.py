"""Training checkpoints: atomic layout (layout.py), RNG/trainer state (state.py), save/restore
through DeepSpeed (manager.py), consolidated weights for export (consolidate.py) and weights-only
reading of DeepSpeed's files for both (safe_load.py)."""
from hybrid_lm.train.checkpoint.consolidate import LoadedModel, load_model_state
from hybrid_lm.train.checkpoint.layout import CheckpointError
from hybrid_lm.train.checkpoint.manager import CheckpointConfig

__all__ = ["CheckpointConfig", "CheckpointError", "LoadedModel", "load_model_state"]
