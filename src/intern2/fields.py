"""Typed values from YAML / JSON: a value checked against a dataclass field's type hint, with the conversions
those formats need (lists for tuples, ints for floats, PyYAML's '1e-3' strings for floats). Configs and weights
metadata read their fields through here, so a wrong type is one message naming the field and what was expected."""
from __future__ import annotations

import collections.abc
import typing
from typing import Any, Union

__all__ = ["coerce", "describe"]


def describe(hint: Any) -> str:
    """A type hint in words ('a list of 2 integers', 'number or null')."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} {describe(args[0])}s" if len(set(args)) == 1 else "a list"
        return f"a list of {describe(args[0])}s" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(hint, getattr(hint, "__name__",
                                                                                                  str(hint)))


def coerce(value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint``; a TypeError when it is not one (the caller names the field)."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin in (tuple, list, collections.abc.Sequence):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TypeError
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise TypeError
            return tuple(coerce(v, a) for v, a in zip(value, args))
        items = [coerce(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if origin is not list else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise TypeError
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads '1e-3' (YAML 1.1 wants '1.0e-3') as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint in (bool, str):
        if isinstance(value, hint):
            return value
        raise TypeError
    return value  # other hints (dataclasses are built by the caller, Literal-like strings checked by it)
