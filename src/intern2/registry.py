"""Model registry: name -> builder. Builders made by :func:`register_variant` resolve a pretrained tag to its
:class:`~intern2.weights.Weights` record (the architecture it needs, its file, protocol and labels)."""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Dict, List, Optional

from torch import nn

__all__ = ["register_model", "register_variant", "list_models", "get_model_builder", "is_model"]

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def register_variant(name: str, build: Callable[[Dict[str, Any]], nn.Module], doc: str,
                     cfg_of_model: Optional[Callable[[nn.Module, Any], Dict[str, Any]]] = None
                     ) -> Callable[..., nn.Module]:
    """Register the builder ``name(pretrained_tag=None, **kwargs)``: it looks up the tag's weights record, calls
    ``build(kwargs)`` with the record's architecture fields (``num_classes``, ``arch_overrides``) under the
    caller's ``kwargs``, and gives the model the record as ``model.pretrained_cfg`` (updated by
    ``cfg_of_model(model, record)``: entries that follow the built architecture, such as a video model's clip
    size). A model built with another class count than the record's gets no label names or published metrics:
    they are not its own."""
    from .weights import cfg_for_head, get_weights

    def builder(pretrained_tag: Optional[str] = None, **kwargs: Any) -> nn.Module:
        weights = get_weights(name, pretrained_tag)
        defaults = dict(weights.arch_overrides)
        if weights.num_classes is not None:
            defaults["num_classes"] = weights.num_classes
        try:
            model = build({**defaults, **kwargs})
        except TypeError as exc:  # a constructor's words for a config key it does not take
            unknown = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
            if unknown is None:
                raise
            key = unknown.group(1)
            hint = f" (a nested field is a mapping: {key.split('.')[0]}={{...}})" if "." in key else ""
            raise ValueError(f"{name}: unknown config key {key!r}{hint}") from None
        cfg = weights.pretrained_cfg(**(cfg_of_model(model, weights) if cfg_of_model else {}))
        model.pretrained_cfg = cfg_for_head(cfg, getattr(model, "num_classes", weights.num_classes))
        return model
    builder.__name__ = name
    builder.__doc__ = doc
    return register_model(builder)


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
