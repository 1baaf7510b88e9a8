"""Run from the checkout's root, `python -m`/`-c` put the root first on sys.path. The source
folders there (models/, kernels/, data/, ...) have no ``__init__.py``, so they are only namespace
portions, and an installed package of the same name wins wherever it sits on sys.path
(transformers imports the Hub's ``kernels`` package). hybrid_lm reaches them through its symlinks
and leaves sys.path alone."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["models", "kernels", "data", "train", "launch", "export"]


def _run_at_root(code: str, **env_extra: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_installed_packages_win_over_the_checkout_folders(tmp_path):
    # A site dir after the root on sys.path, holding regular packages named like our folders.
    for name in FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    code = ("import sys, importlib; "
            f"print(*[importlib.import_module(n).__file__ for n in {FOLDERS!r}]); "
            "print(sys.path[0] == '', 'hybrid_lm' in sys.modules)")
    *files, root_first, imported = _run_at_root(code, PYTHONPATH=str(tmp_path))
    assert [Path(f) for f in files] == [tmp_path / name / "__init__.py" for name in FOLDERS]
    assert root_first == "True" and imported == "False"


def test_transformers_imports_the_hub_kernels_package_from_the_root():
    # transformers' hub_kernels integration imports `kernels` (a transformers dependency)
    code = ("import transformers.models.llama.modeling_llama, kernels, sys; "
            "print(kernels.__file__, 'hybrid_lm' in sys.modules)")
    kernels_file, imported = _run_at_root(code)
    assert imported == "False"
    assert not Path(kernels_file).resolve().is_relative_to(ROOT / "kernels")


def test_hybrid_lm_reaches_the_folders_and_leaves_sys_path_alone():
    code = ("import sys; before = list(sys.path); "
            "import hybrid_lm.models.hybrid, hybrid_lm.kernels.ssd.reference, hybrid_lm.train.loop; "
            "print(sys.path == before, hybrid_lm.models.hybrid.__file__, hybrid_lm.kernels.ssd.reference.__file__)")
    unchanged, hybrid, reference = _run_at_root(code)
    assert unchanged == "True"
    assert Path(hybrid).resolve() == ROOT / "models" / "hybrid.py"
    assert Path(reference).resolve() == ROOT / "kernels" / "ssd" / "reference.py"


def test_layout_folders_are_symlinked_namespace_portions():
    for name in FOLDERS:
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py makes {name} shadow installed packages"
        link = ROOT / "hybrid_lm" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}", link


@pytest.mark.slow
def test_wheel_holds_every_module_under_hybrid_lm(tmp_path):
    """A non-editable wheel carries every source file as hybrid_lm.<folder>.*, nothing at top level."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "runs", "artifacts", "__pycache__", ".pytest_cache", "tests",
        "bench", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    names = set(zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist())
    assert {n.split("/")[0] for n in names} == {"hybrid_lm", "hybrid_lm-0.1.0.dist-info"}
    expected = {f"hybrid_lm/{p.relative_to(src).as_posix()}" for name in FOLDERS
                for p in (src / name).rglob("*.py")}
    expected |= {"hybrid_lm/export/README.md", "hybrid_lm/__init__.py", "hybrid_lm/cli.py"}
    assert expected <= names, sorted(expected - names)
