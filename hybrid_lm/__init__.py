"""hybrid-lm: distributed pretraining of hybrid long-context language models.

The source folders at the repository root install as subpackages of this one:
``hybrid_lm.models``, ``hybrid_lm.kernels``, ``hybrid_lm.data``, ``hybrid_lm.train``,
``hybrid_lm.launch`` and ``hybrid_lm.export``.
"""

__version__ = "0.1.0"
