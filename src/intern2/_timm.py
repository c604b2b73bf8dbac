"""Register intern2's image models in timm: entrypoints and every pretrained tag in timm's pretrained registry, so
``timm.create_model('internimage_t.in1k', pretrained=True)``, ``timm.list_pretrained('internimage*')`` and
``timm.get_pretrained_cfg_value(...)`` work, and timm's ``local-dir:`` / ``hf-hub:`` names load intern2 folders.

``import intern2`` must stay light and timm takes seconds to import, so registration happens when timm is
imported (now, if it already is; otherwise right after its import finishes, through a one-shot import hook).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, Dict

__all__ = ["install", "register_with_timm", "default_cfgs"]

# Filled by register_with_timm: timm's register_model reads the entrypoint module's ``default_cfgs``.
default_cfgs: Dict[str, Any] = {}
_ORIGIN = dict(license="mit", origin_url="https://github.com/OpenGVLab/InternImage", paper_ids="arXiv:2211.05778",
               paper_name="InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions")


def _timm_cfg(record) -> Dict[str, Any]:
    """A weights record in timm's PretrainedCfg fields."""
    protocol = record.protocol
    cfg = dict(hf_hub_id=record.hf_hub_id, hf_hub_filename=record.file, url=record.url or "",
               num_classes=record.num_classes, input_size=tuple(protocol.input_size), crop_pct=protocol.crop_pct,
               crop_mode=protocol.crop_mode, interpolation=protocol.interpolation, mean=tuple(protocol.mean),
               std=tuple(protocol.std), first_conv=record.first_conv, classifier=record.classifier, **_ORIGIN)
    return {**cfg, **{k: v for k, v in record.extra.items() if k in ("pool_size", "fixed_input_size")}}


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
                   cache_dir: Any = None, pretrained_model_args: Any = None, **kwargs: Any):
        """timm's entrypoint contract: ``pretrained_cfg`` is a tag, or timm's resolved cfg (a dict or
        PretrainedCfg, from a tag or from a ``local-dir:`` / ``hf-hub:`` name, whose folder then holds the model);
        ``pretrained_model_args`` (the folder's saved arguments) is read from the folder itself."""
        from .factory import create_model, from_pretrained
        cfg = pretrained_cfg if isinstance(pretrained_cfg, (str, type(None))) else \
            (pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict())
        if isinstance(cfg, dict) and cfg.get("source") in ("local-dir", "hf-hub"):
            from .hub import HF_HUB_PREFIX
            kept = {k: v for k, v in kwargs.items() if k not in (pretrained_model_args or {})}
            if cfg["source"] == "local-dir":
                return from_pretrained(cfg["file"], weights=pretrained, **kept)
            return from_pretrained(HF_HUB_PREFIX + cfg["hf_hub_id"], weights=pretrained, cache_dir=cache_dir, **kept)
        tag = cfg if isinstance(cfg, str) else (cfg or {}).get("tag")
        return create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained,
                            pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir, **kwargs)
    entrypoint.__name__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name} (intern2), with timm's entrypoint arguments."
    return entrypoint


def register_with_timm() -> None:
    """Add every intern2 image model and its pretrained tags to timm's registries (idempotent)."""
    from timm.models import generate_default_cfgs, is_model, register_model

    from .models import internimage
    from .weights import get_weights, pretrained_tags
    names = [name for name in internimage.INTERNIMAGE_VARIANTS if not is_model(name)]
    default_cfgs.update(generate_default_cfgs({f"{name}.{tag}": _timm_cfg(get_weights(name, tag))
                                               for name in names for tag in pretrained_tags(name)}))
    for name in names:
        register_model(_entrypoint(name))


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
