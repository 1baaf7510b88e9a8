"""ATLAS family (Omega rule, polynomial features, Muon): layer letters X (ATLAS) and D
(DeepTransformer). The memory layer and kernels are shared with Titans; see models/titans/README.md."""
from hybrid_lm.models.atlas import layers as _layers  # noqa: F401  (registers X, D)
from hybrid_lm.models.atlas.config import AtlasConfig, DeepTransformerConfig

__all__ = ["AtlasConfig", "DeepTransformerConfig"]
