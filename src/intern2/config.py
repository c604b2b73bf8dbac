"""Configs: frozen dataclasses, filled from YAML files and ``--set a.b=value`` overrides (values parsed as YAML)."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

import yaml

from .fields import coerce, describe

__all__ = ["from_dict", "to_dict", "load_config", "apply_overrides", "parse_assignments", "describe_fields",
           "check_positive", "check_range", "error_message"]

T = TypeVar("T")


def error_message(exc: BaseException) -> str:
    """The message of a user-caused failure as the user should read it: a KeyError's ``str()`` quotes it."""
    return exc.args[0] if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) else str(exc)


def _dataclass_type(hint: Any) -> Optional[type]:
    """The dataclass inside a field's type hint (``X`` or ``Optional[X]``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls: Type[T], values: Dict[str, Any], where: str = "config") -> T:
    """Build a (nested) dataclass from a mapping; unknown keys are errors that name the valid ones."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        inner = _dataclass_type(hints[name])
        if inner is not None:
            if not isinstance(value, (dict, inner)) and not (value is None and typing.get_args(hints[name])):
                raise ValueError(f"{where}.{name}: expected a mapping of {inner.__name__} fields, got {value!r}")
            kwargs[name] = from_dict(inner, value, f"{where}.{name}") if isinstance(value, dict) else value
            continue
        try:
            kwargs[name] = coerce(value, hints[name])
        except TypeError:
            raise ValueError(f"{where}.{name}: expected {describe(hints[name])}, got {value!r}") from None
    return cls(**kwargs)  # the config's own range checks name their fields


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain, YAML/JSON-ready dict of a dataclass config (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))


def apply_overrides(cfg: T, assignments: Sequence[str]) -> T:
    """Apply ``a.b=value`` strings; the value is parsed as YAML (``3``, ``1e-4``, ``[1, 1, 2, 1]``, ``null``); a
    mapping is merged into the mapping it sets, as a ``--config`` file's is (``null`` first to replace it)."""
    data = to_dict(cfg)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {assignment!r}: expected key=value, e.g. train.lr=1e-3")
        value = _yaml_value(assignment, text) if text.strip() else ""  # `key=` means empty, not YAML's null
        node = data
        parts = key.split(".")
        free = False  # inside a free-form mapping (model_args): its keys are the model's, created as needed
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if (part in node and node[part] is None) or (free and part not in node):  # e.g. model_args unset
                    node[part] = {}
                else:
                    raise ValueError(f"--set {assignment!r}: {'.'.join(parts[:depth + 1])} is not a config section")
            free = free or part == "model_args"
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):  # merged, as a --config mapping is
            _deep_update(node[parts[-1]], value, f"--set {key}")
        else:
            node[parts[-1]] = value
    return from_dict(type(cfg), data)


def load_config(cls: Type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                base: Optional[Dict[str, Any]] = None, base_name: str = "recipe") -> T:
    """Defaults of ``cls``, updated by ``base`` (a recipe's config, named ``base_name`` in errors), then by a YAML
    file (if given), then by ``overrides``."""
    cfg = cls()
    if base is not None:
        merged = to_dict(cfg)
        _deep_update(merged, base, base_name)
        cfg = from_dict(cls, merged, base_name)
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            reason = _yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else exc
            raise ValueError(f"config file {path}: not a readable YAML file ({reason})") from exc
        merged = to_dict(cfg)
        _deep_update(merged, data, str(path))
        cfg = from_dict(cls, merged, str(path))
    return apply_overrides(cfg, overrides)


def _deep_update(base: Dict[str, Any], update: Dict[str, Any], where: str) -> None:
    if not isinstance(update, dict):
        raise ValueError(f"{where}: expected a mapping at the top level, got {type(update).__name__}")
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value, f"{where}:{key}")
        else:
            base[key] = value


def parse_assignments(assignments: Sequence[str]) -> Dict[str, Any]:
    """``["depths=[1, 1, 2, 1]", "num_classes=3"]`` -> keyword arguments (values parsed as YAML)."""
    kwargs = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {assignment!r}: expected key=value")
        kwargs[key] = _yaml_value(assignment, text)
    return kwargs


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if problem is None:
        return " ".join(str(exc).split())
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def _yaml_value(assignment: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {assignment!r}: value is not valid YAML ({_yaml_problem(exc)})") from exc


def _field_comments(cls: type) -> Dict[str, str]:
    """The trailing ``# comment`` of each field line in the class bodies of ``cls`` and its dataclass bases: the
    fields' documentation lives next to them in the source, and is read from there."""
    comments: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.MULTILINE):
            comments[match.group(1)] = match.group(2).strip()
    return comments


def describe_fields(cls: type, prefix: str = "", defaults: Any = None) -> List[str]:
    """One line per config field, nested configs flattened (``train.lr``): name, type, default and meaning. A
    nested config's defaults are those its field gives (a task's own ``train`` defaults), from ``defaults``."""
    lines = []
    hints, comments = typing.get_type_hints(cls), _field_comments(cls)
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name) if defaults is not None else \
            f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        inner = _dataclass_type(hints[f.name])
        if inner is not None:
            given = isinstance(default, inner)
            lines += describe_fields(type(default) if given else inner, f"{prefix}{f.name}.",
                                     default if given else None)
            continue
        meaning = f"  {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  {prefix}{f.name} ({describe(hints[f.name])}) = {to_dict_value(default)}{meaning}")
    return lines


def to_dict_value(value: Any) -> str:
    """A default as YAML would write it in --set (tuples as lists, None as null)."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(to_dict_value(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_range(cfg: Any, name: str, interval: str, pair: bool = False, prefix: str = "") -> None:
    """Range check for a config's ``__post_init__``: the field (a number, a tuple of numbers, or None) lies in
    ``interval``, written as in mathematics (``"[0, 1)"``, ``"(0, inf)"``); with ``pair``, it is a (low, high)
    pair with low <= high. The error names the field (after ``prefix``, e.g. ``train.``) and the interval."""
    value = getattr(cfg, name)
    if value is None:
        return
    low_bracket, bounds, high_bracket = interval[0], interval[1:-1], interval[-1]
    low, high = (float(bound) for bound in bounds.split(","))
    values = value if isinstance(value, (tuple, list)) else (value,)

    def inside(v: float) -> bool:
        return ((low < v if low_bracket == "(" else low <= v) and
                (v < high if high_bracket == ")" else v <= high))
    if pair and not (len(values) == 2 and all(map(inside, values)) and values[0] <= values[1]):
        raise ValueError(f"{prefix}{name}: expected a (low, high) pair with low <= high, both in {interval}, got "
                         f"{list(values)}")
    if not all(isinstance(v, (int, float)) and inside(v) for v in values):
        shown = list(value) if isinstance(value, (tuple, list)) else value
        what = "values" if len(values) > 1 else "a number"
        raise ValueError(f"{prefix}{name}: expected {what} in {interval}, got {shown}")


def check_positive(cfg: Any, *names: str) -> None:
    """Range check for a config's ``__post_init__``: each named field (a number, a tuple of numbers, or None)
    must be positive; the error names the field."""
    for name in names:
        value = getattr(cfg, name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(v is not None and not v > 0 for v in values):
            raise ValueError(f"{name}: expected positive values, got {value}")
