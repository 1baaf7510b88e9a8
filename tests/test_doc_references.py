"""Comments and docs name only what a reader of this repository can open: no absolute machine
paths, no notes kept outside the repo (the shared reliability/performance/style notes, the model
spec and its section numbers), and every backticked file path or ``.md`` name exists here. Cite
a paper by name and section, or say the rule in place."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"/work/|\.\./shared/|\bspec/|\bspec (?:0?\d|§)|§\s?\d|\bRELIABILITY\b"
                     r"|\b(?:PERFORMANCE|STYLE|SLURM-LOCAL)\.md\b")
PATH = re.compile(r"``?([A-Za-z0-9_./-]+\.(?:py|md|yaml|sh|sbatch|toml))``?")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "*.sh", "*.sbatch", "*.toml", "Makefile",
                              ".ci/*"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.split() if (ROOT / name).is_file() and name != "tests/test_doc_references.py"]


def test_no_reference_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in _tracked()
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "\n".join(found)


def test_backticked_paths_exist():
    missing = []
    for path in _tracked():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in PATH.findall(line):
                if "/" not in name and not name.endswith(".md"):
                    continue  # a bare module name: often a file of another project (``ssd_minimal.py``)
                if not any((base / name).exists() for base in (ROOT, path.parent)):
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    assert not missing, "\n".join(missing)
