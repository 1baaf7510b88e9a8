"""Maps the repository's top-level folders onto the one importable package ``hybrid_lm``.

The layout is the architecture (models/, kernels/, data/, train/, launch/, export/), but bare
top-level names such as ``data`` or ``models`` would collide with other installed packages, so
each folder installs as ``hybrid_lm.<folder>``. Everything else lives in pyproject.toml.
"""
from setuptools import find_packages, setup

TOP_LEVEL = ["models", "kernels", "data", "train", "launch", "export"]

package_dir = {"hybrid_lm": "hybrid_lm"}
packages = ["hybrid_lm"]
for folder in TOP_LEVEL:
    package_dir[f"hybrid_lm.{folder}"] = folder
    packages.append(f"hybrid_lm.{folder}")
    for sub in find_packages(folder):
        packages.append(f"hybrid_lm.{folder}.{sub}")

setup(package_dir=package_dir, packages=packages, package_data={
        "hybrid_lm.export": ["remote/template/*.py", "README.md"],
        "hybrid_lm.kernels": ["*/README.md"],
    })
