"""The registry that maps a letter of the layer pattern to the family that builds it.

Families register themselves on import; ``ensure_builtin_layers()`` imports the built-in ones so
that the stack (``models/hybrid.py``) and config validation see every letter without importing
any family by name. A new family adds a module that calls ``register_layer`` and one entry in
``BUILTIN_FAMILIES``.

This module imports no family and, at run time, nothing else of ours, so ``models/config.py`` and
every family import it at the top. The families are named as strings, not imported, for two
reasons: a family imports ``register_layer`` from here (a plain import back would be a cycle), and
a remote-code export vendors only the families its pattern uses (``export/remote``), so a
built-in family that is absent is skipped.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from hybrid_lm.models.common.mixer import Layer
    from hybrid_lm.models.config import ModelConfig

Builder = Callable[["ModelConfig", int], "Layer"]

#: modules whose import registers the built-in layer letters
BUILTIN_FAMILIES: tuple[str, ...] = (
    "hybrid_lm.models.common.mlp",
    "hybrid_lm.models.attention",
    "hybrid_lm.models.mamba2",
    "hybrid_lm.models.titans",
    "hybrid_lm.models.atlas",
)


@dataclass(frozen=True)
class LayerSpec:
    letter: str
    name: str
    build: Builder
    description: str


_REGISTRY: dict[str, LayerSpec] = {}


def register_layer(letter: str, name: str, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator: ``@register_layer("M", "mamba2")`` on a ``(config, layer_index) -> Layer`` builder."""
    if len(letter) != 1 or letter.isspace():
        raise ValueError(f"layer letters are single non-space characters, got {letter!r}")

    def wrap(build: Builder) -> Builder:
        existing = _REGISTRY.get(letter)
        if existing is not None and existing.name != name:
            raise ValueError(f"layer letter {letter!r} is taken by {existing.name!r}")
        _REGISTRY[letter] = LayerSpec(letter, name, build, description)
        return build

    return wrap


def ensure_builtin_layers() -> None:
    for module in BUILTIN_FAMILIES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # A family that is not written yet must not break the others; a family that exists
            # but fails to import for another reason must fail loudly.
            if exc.name != module:
                raise


def layer_specs() -> dict[str, LayerSpec]:
    ensure_builtin_layers()
    return dict(_REGISTRY)


def get_layer_spec(letter: str) -> LayerSpec:
    specs = layer_specs()
    if letter not in specs:
        known = ", ".join(f"{s.letter}={s.name}" for s in specs.values())
        raise KeyError(f"unknown layer letter {letter!r} (known: {known})")
    return specs[letter]
