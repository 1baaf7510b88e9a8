"""Copy our own model source into an export folder as flat files with relative imports.

transformers loads remote code by copying ``modeling_*.py`` and every file it reaches through
``from .name import ...`` lines into one flat package (``dynamic_module_utils.get_relative_imports``
is a regex: it sees ``from .x import y`` but not ``from . import x``) and checks that every
absolute import is installed (``check_imports``). So the exported code may import torch and
transformers but never ``hybrid_lm``. We therefore:

1. collect the transitive closure of ``hybrid_lm.*`` imports from a set of root modules (``ast``);
2. flatten each module's dotted name to one file name (``hybrid_lm.models.titans.layers`` ->
   ``models_titans_layers.py``; a package's ``__init__`` becomes ``models_titans.py``);
3. rewrite every ``from hybrid_lm.a import b`` to ``from .a_flat import b``; an imported submodule
   becomes ``from .flat import __name__ as _vendored_flat`` (so the loader finds the file) plus
   ``from . import flat as b``; string literals naming a module (the registry's
   ``BUILTIN_FAMILIES``) become ``__package__ + ".flat"``, so ``importlib`` finds the vendored copy.

The source is copied, not re-typed, so the export runs the very code that trained the model.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from hybrid_lm.models.model_dir import ExportError

ROOT = "hybrid_lm"
_MODULE_STRING = re.compile(r"^hybrid_lm(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def flat_name(module: str) -> str:
    """``hybrid_lm.models.titans.layers`` -> ``models_titans_layers``."""
    if not module.startswith(ROOT + "."):
        raise ExportError(f"not a {ROOT} module: {module}")
    return module[len(ROOT) + 1:].replace(".", "_")


def _source_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ExportError(f"cannot vendor {module}: no Python source file")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of a (possibly relative) ``from X import`` in ``module``."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@dataclass
class _Edit:
    start: tuple[int, int]  # (1-based line, col)
    end: tuple[int, int]
    text: str


def _imports_of(module: str) -> tuple[ast.Module, list[tuple[ast.stmt, str, list[tuple[str, str | None, bool]]]]]:
    """Parsed source and its hybrid_lm imports: (node, from-module, [(name, asname, is_submodule)])."""
    path = _source_file(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    raise ExportError(f"{path}:{node.lineno}: 'import {alias.name}' cannot be vendored; "
                                      f"write 'from {alias.name.rsplit('.', 1)[0]} import ...'")
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, is_package)
            if source == ROOT or source.startswith(ROOT + "."):
                names = [(a.name, a.asname, _is_module(f"{source}.{a.name}")) for a in node.names]
                if any(a.name == "*" for a in node.names):
                    raise ExportError(f"{path}:{node.lineno}: star imports cannot be vendored")
                found.append((node, source, names))
    return tree, found


def collect(roots: list[str]) -> list[str]:
    """Every hybrid_lm module reachable from ``roots`` by imports, sorted."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        _, found = _imports_of(module)
        for _, source, names in found:
            todo.append(source)
            todo.extend(f"{source}.{name}" for name, _, sub in names if sub)
    return sorted(seen)


def _rewrite(module: str, vendored: set[str]) -> str:
    path = _source_file(module)
    text = path.read_text()
    tree, found = _imports_of(module)
    edits: list[_Edit] = []
    for node, source, names in found:
        indent = " " * node.col_offset
        lines: list[str] = []
        attrs = [(n, a) for n, a, sub in names if not sub]
        if attrs:
            listed = ", ".join(n if a is None else f"{n} as {a}" for n, a in attrs)
            lines.append(f"from .{flat_name(source)} import {listed}")
        for name, asname, sub in names:
            if sub:
                flat = flat_name(f"{source}.{name}")
                lines.append(f"from .{flat} import __name__ as _vendored_{flat}  # lets transformers find the file")
                lines.append(f"from . import {flat} as {asname or name}")
        edits.append(_Edit((node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset),
                           ("\n" + indent).join(lines)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            edits.append(_Edit((node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset),
                               f'__package__ + ".{flat_name(node.value)}"'))
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def pos(p: tuple[int, int]) -> int:
        # ast columns are utf-8 byte offsets; our sources are ASCII in code positions that matter,
        # but convert properly anyway
        line = lines[p[0] - 1]
        return offsets[p[0] - 1] + len(line.encode("utf-8")[: p[1]].decode("utf-8", errors="ignore"))

    for edit in sorted(edits, key=lambda e: e.start, reverse=True):
        text = text[: pos(edit.start)] + edit.text + text[pos(edit.end):]
    _check_clean(text, module)
    return text


def _check_clean(text: str, module: str) -> None:
    """The rewritten file must not mention hybrid_lm in any import."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(ROOT):
            raise ExportError(f"vendoring {module}: import of {node.module} left after rewriting")
        if isinstance(node, ast.Import) and any(a.name.startswith(ROOT) for a in node.names):
            raise ExportError(f"vendoring {module}: import of hybrid_lm left after rewriting")


def vendor(roots: list[str], out_dir: Path) -> list[str]:
    """Write the rewritten closure of ``roots`` into ``out_dir``; returns the flat file stems."""
    modules = collect(roots)
    vendored = set(modules)
    stems = []
    for module in modules:
        stem = flat_name(module)
        (Path(out_dir) / f"{stem}.py").write_text(_rewrite(module, vendored))
        stems.append(stem)
    return stems
