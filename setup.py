"""Lists the one importable package, ``hybrid_lm``, and the subpackages it reaches.

The layout is the architecture (models/, kernels/, data/, train/, launch/, export/), but bare
top-level names such as ``data`` or ``kernels`` would collide with other installed packages, so
each folder is reached only as ``hybrid_lm.<folder>``, through the symlink ``hybrid_lm/<folder>
-> ../<folder>``. The folders themselves have no ``__init__.py``: a folder without one is only a
namespace portion, which the import system passes over in favour of a regular package anywhere on
``sys.path``, so running from the checkout's root cannot shadow an installed ``kernels``.
Everything else lives in pyproject.toml.
"""
from setuptools import find_packages, setup

TOP_LEVEL = ["models", "kernels", "data", "train", "launch", "export"]

packages = ["hybrid_lm"]
for folder in TOP_LEVEL:
    packages.append(f"hybrid_lm.{folder}")
    packages.extend(f"hybrid_lm.{folder}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_data={
        "hybrid_lm.export": ["remote/template/*.py", "README.md"],
        "hybrid_lm.kernels": ["*/README.md"],
    })
