"""Configs: frozen dataclasses, filled from YAML files and ``--set a.b=value`` overrides (values parsed as YAML)."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Type, TypeVar, Union

import yaml

__all__ = ["from_dict", "to_dict", "load_config", "apply_overrides", "parse_assignments"]

T = TypeVar("T")


def _dataclass_type(hint: Any) -> Optional[type]:
    """The dataclass inside a field's type hint (``X`` or ``Optional[X]``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """YAML gives lists where configs hold tuples (frozen dataclasses must stay hashable), and PyYAML reads
    '1e-3' as a string (YAML 1.1 wants '1.0e-3'): convert both."""
    options = (hint, *typing.get_args(hint))
    if isinstance(value, list) and any(o is tuple or typing.get_origin(o) is tuple for o in options):
        return tuple(value)
    if isinstance(value, str) and float in options and str not in options:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    return value


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
        if inner is not None and isinstance(value, dict):
            value = from_dict(inner, value, f"{where}.{name}")
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


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
    """Apply ``a.b=value`` strings; the value is parsed as YAML (``3``, ``1e-4``, ``[1, 1, 2, 1]``, ``null``)."""
    data = to_dict(cfg)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {assignment!r}: expected key=value, e.g. train.lr=1e-3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {assignment!r}: value is not valid YAML ({exc})") from exc
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if part in node and node[part] is None:  # an unset optional mapping (e.g. model_args)
                    node[part] = {}
                else:
                    raise ValueError(f"--set {assignment!r}: {'.'.join(parts[:depth + 1])} is not a config section")
            node = node[part]
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def load_config(cls: Type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, updated by a YAML file (if given), then by ``overrides``."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"config file {path}: {exc}") from exc
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
        try:
            kwargs[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {assignment!r}: value is not valid YAML ({exc})") from exc
    return kwargs
