"""The top-level folders form layers: each imports only those below it, so no two import each
other (an import inside a function to dodge a cycle counts too). kernels < models < data <
train < export < launch; ``hybrid_lm.typed_config`` is below all of them. Inside models/ and
kernels/ (and the export adapter table) our own imports are plain module-level ones, so an import
cycle shows at import time instead of hiding in a function."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "kernels": set(),
    "models": {"kernels"},
    "data": set(),
    "train": {"kernels", "models", "data"},
    "export": {"kernels", "models", "data", "train"},
    "launch": {"kernels", "models", "data", "train", "export"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "hybrid_lm":  # from hybrid_lm import train
                found += [(node.lineno, f"hybrid_lm.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folder_imports_only_the_layers_below_it(folder):
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "template" in path.relative_to(ROOT).parts:  # remote code: vendored, imports no hybrid_lm
            continue
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "hybrid_lm" and len(parts) > 1 and parts[1] in ALLOWED and parts[1] != folder \
                    and parts[1] not in ALLOWED[folder]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def _imports_inside_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
                if isinstance(node, (ast.Import, ast.ImportFrom)) and any(n.startswith("hybrid_lm") for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(names)} in {func.name}()")
    return found


def test_models_kernels_and_adapters_import_ours_at_module_level():
    paths = [*sorted((ROOT / "models").rglob("*.py")), *sorted((ROOT / "kernels").rglob("*.py")),
             ROOT / "export" / "adapters.py"]
    wrong = [line for path in paths for line in _imports_inside_functions(path)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_each_module_imports_first_in_a_fresh_process():
    """With plain module-level imports, a cycle fails whichever module is imported first; so
    import each one first (our modules dropped from sys.modules in between) and build a config
    with every letter."""
    modules = []
    for folder in ("kernels", "models", "export"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if "template" in rel.parts:
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            modules.append(".".join(("hybrid_lm", *parts)))
    code = f"""
import importlib, sys
for module in {modules!r}:
    for name in [n for n in sys.modules if n.startswith("hybrid_lm")]:
        del sys.modules[name]
    importlib.import_module(module)
    from hybrid_lm.models.config import ModelConfig
    ModelConfig(layer_pattern="A-M-T-C-G-L-X-D-", d_model=32)
print(len({modules!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str(len(modules))
