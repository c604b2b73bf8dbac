"""Register intern2's image models in timm's registry, so ``timm.create_model('internimage_t')`` works.

``import intern2`` must stay light and timm takes seconds to import, so registration happens when timm is
imported (now, if it already is; otherwise right after its import finishes, through a one-shot import hook).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["install", "register_with_timm"]


def register_with_timm() -> None:
    """Add every intern2 image model to timm's registry (idempotent)."""
    from timm.models import is_model, register_model

    from .factory import create_model
    from .models import internimage

    for name in internimage.INTERNIMAGE_VARIANTS:
        if is_model(name):
            continue

        def entrypoint(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                       _name=name, **kwargs):
            tag = pretrained_cfg if isinstance(pretrained_cfg, str) else None
            return create_model(f"{_name}.{tag}" if tag else _name, pretrained=pretrained,
                                pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
        entrypoint.__name__ = name
        entrypoint.__module__ = internimage.__name__
        register_model(entrypoint)


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register_with_timm()
        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "timm" in sys.modules:
        register_with_timm()
    elif importlib.util.find_spec("timm") is not None:
        sys.meta_path.insert(0, _RegisterAfterTimmImport())
