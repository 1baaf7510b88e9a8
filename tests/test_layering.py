"""The top-level folders form layers: each imports only those below it, so no two import each
other (an import inside a function to dodge a cycle counts too). kernels < models < data <
train < export < launch; ``hybrid_lm.typed_config`` is below all of them."""
import ast
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
