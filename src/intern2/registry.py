"""Model registry: name -> builder, with the default (pretrained-less) configuration of each variant."""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Optional

from torch import nn

__all__ = ["register_model", "list_models", "get_model_builder", "is_model"]

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Sorted registered model names, optionally filtered by a shell-style pattern ('internimage_*')."""
    _import_model_families()
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def is_model(name: str) -> bool:
    _import_model_families()
    return name in _MODELS


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; a KeyError lists close names when it is unknown."""
    _import_model_families()
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name.split('_')[0]}*") or sorted(_MODELS)[:10]
        raise KeyError(f"unknown model {name!r}; known models include {close}")
    return _MODELS[name]


def _import_model_families() -> None:
    """Model families register on import; importing them lazily keeps `import intern2` light."""
    from . import models  # noqa: F401
