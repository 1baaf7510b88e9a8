"""Model families and the hybrid stack. Parallelism never enters here (see train/parallel)."""
from hybrid_lm.models.config import AttentionConfig, Mamba2Config, MLPConfig, ModelConfig, ModelConfigError
from hybrid_lm.models.hybrid import HybridLM, ModelOutput

__all__ = ["AttentionConfig", "Mamba2Config", "MLPConfig", "ModelConfig", "ModelConfigError", "HybridLM", "ModelOutput"]
