"""Strict conversion between plain dicts (YAML/TOML/JSON) and typed, nested dataclass configs.

Every config in hybrid-lm is a dataclass whose fields carry type hints and docstrings. This
module is the one place that turns user text into those objects, so that an unknown key, a
wrong type or a bad override fails *before* any worker starts, with the dotted path of the
offending key in the message (``model.attention.n_heads: expected int, got 'eight'``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be turned into its typed form; the message names the key."""


class InvalidValue(ConfigError):
    """An impossible value found by a config section's own checks (its ``__post_init__`` or
    ``validate()``), with ``key`` relative to that section: the section does not know where it
    sits in the job, so ``from_dict`` re-raises the error under the section's dotted path
    (``chunk_size`` raised by ``TitansConfig`` becomes ``model.titans.chunk_size``). ``section``
    only prefixes the message of an object built in code, outside the loader."""

    def __init__(self, key: str, problem: str, *, section: str = "") -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{section}.{key}: {problem}" if section else f"{key}: {problem}")

    def under(self, path: str) -> InvalidValue:
        """The same error, reported at ``path.key``."""
        return type(self)(f"{path}.{self.key}" if path else self.key, self.problem)


def require_at_least(section: Any, minimum: float, *names: str) -> None:
    """InvalidValue for the first field of ``names`` below ``minimum``, NaN or infinite (None passes:
    optional fields mean "unset")."""
    for name in names:
        value = getattr(section, name)
        if value is not None and not (value >= minimum and not math.isinf(value)):
            raise InvalidValue(name, f"must be >= {minimum}, got {value}")


def require_positive(section: Any, *names: str) -> None:
    """InvalidValue for the first field of ``names`` that is not a finite number > 0 (None passes)."""
    for name in names:
        value = getattr(section, name)
        if value is not None and not (value > 0 and not math.isinf(value)):
            raise InvalidValue(name, f"must be > 0, got {value}")


def validate_section(obj: Any, path: str) -> None:
    """Run ``obj.validate()`` when it has one, reporting an InvalidValue under ``path``; a section
    uses it to check the sections it holds when it is built in code."""
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except InvalidValue as exc:
            raise exc.under(path) from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, path): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):
            # PyYAML implements YAML 1.1, whose floats need a dot: ``lr: 3e-3`` and the override
            # ``optim.lr=1e-3`` arrive as strings although every user means a float
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, then run its ``validate()`` if it has one; unknown
    keys, wrong types and impossible values raise ConfigError naming the dotted key under ``path``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s} (known keys of {cls.__name__}: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name)
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):  # a section's own checks of impossible values, run at load
            validate()
        return obj
    except InvalidValue as exc:
        raise (exc.under(path) if path else exc) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (round-trips through ``from_dict``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override_value(text: str) -> Any:
    """``train.steps=200`` gives 200; YAML scalars so ``true``, ``null``, ``[1,2]`` work too."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (copied); malformed ones raise ConfigError."""
    result = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = parse_override_value(raw)
    return result


def _syntax_error(path: Path, exc: Exception) -> ConfigError:
    """One line ``config file PATH:LINE:COL: problem`` for a YAML, TOML or JSON parser error
    (their own messages span several lines, or bury the position in the text)."""
    import re

    line = col = None
    problem = str(exc)
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:  # PyYAML: 0-based marks, the problem and its context as separate fields
        line, col = mark.line + 1, mark.column + 1
        problem = exc.problem or problem  # type: ignore[attr-defined]
        if getattr(exc, "context", None):
            problem = f"{problem} ({exc.context})"  # type: ignore[attr-defined]
    elif getattr(exc, "lineno", None) is not None and getattr(exc, "colno", None) is not None:
        line, col = exc.lineno, exc.colno  # type: ignore[attr-defined]
        problem = getattr(exc, "msg", problem)
    else:  # tomllib before 3.14 (and tomli) put "(at line L, column C)" into the message only
        found = re.search(r"\s*\(at line (\d+), column (\d+)\)", problem)
        if found:
            line, col = int(found.group(1)), int(found.group(2))
            problem = problem[: found.start()] + problem[found.end():]
    problem = " ".join(problem.split())
    where = f"{path}:{line}:{col}" if line is not None else str(path)
    return ConfigError(f"config file {where}: {problem}")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON config file into a dict; a file that does not
    parse raises ConfigError naming its line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start})") from None
    if path.suffix == ".toml":
        import sys

        if sys.version_info >= (3, 11):
            import tomllib
        else:  # tomllib is 3.11+; pyproject.toml installs tomli on 3.10 for this
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError as exc:
                raise ConfigError(f"config file {path}: TOML on Python < 3.11 needs tomli (pip install 'tomli>=2')") from exc
        parse, errors = tomllib.loads, (tomllib.TOMLDecodeError,)
    elif path.suffix == ".json":
        parse, errors = json.loads, (json.JSONDecodeError,)
    else:
        import yaml

        parse, errors = (lambda t: yaml.safe_load(t) or {}), (yaml.YAMLError,)
    try:
        data = parse(text)
    except errors as exc:
        raise _syntax_error(path, exc) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data
