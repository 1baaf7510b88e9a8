"""hybrid-lm: distributed pretraining of hybrid long-context language models.

The source folders at the repository root are reached as subpackages of this one:
``hybrid_lm.models``, ``hybrid_lm.kernels``, ``hybrid_lm.data``, ``hybrid_lm.train``,
``hybrid_lm.launch`` and ``hybrid_lm.export``. Each is a symlink here to ``../<folder>``, and the
folders have no ``__init__.py``, so a bare ``kernels`` or ``data`` at the checkout's root never
shadows an installed package of that name (setup.py says why).
"""

__version__ = "0.1.0"
