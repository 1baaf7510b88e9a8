"""hybrid-lm: distributed pretraining of hybrid long-context language models.

The source folders at the repository root install as subpackages of this one:
``hybrid_lm.models``, ``hybrid_lm.kernels``, ``hybrid_lm.data``, ``hybrid_lm.train``,
``hybrid_lm.launch`` and ``hybrid_lm.export``.
"""
import os
import sys

__version__ = "0.1.0"


def _drop_checkout_root_from_path() -> None:
    """The checkout's root is never an import root of this project (its folders install as
    ``hybrid_lm.*``), but ``python -m``/``-c`` run from it put it first on ``sys.path``, where the
    bare folders shadow installed packages of the same name: transformers imports the ``kernels``
    package from the Hub and would get ``kernels/`` of this checkout instead. A root the user put
    on ``PYTHONPATH`` stays: that is a request, not an accident."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "setup.py")):
        return  # an installed copy: site-packages is not a checkout
    explicit = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    if root in explicit:
        return  # the user asked for it (e.g. PYTHONPATH=. for an eval plugin kept at the root)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]


_drop_checkout_root_from_path()
