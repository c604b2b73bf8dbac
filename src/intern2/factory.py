"""Public model API: create_model, from_pretrained, save_pretrained (re-exported by ``intern2``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from torch import nn

from .checkpoint import CONFIG_NAME, load_checkpoint, read_checkpoint, save_pretrained as _save
from .registry import get_model_builder, is_model

__all__ = ["create_model", "from_pretrained", "save_pretrained", "pretrained_file"]

ENV_HOME = "INTERN2_HOME"


def pretrained_file(pretrained_cfg: Dict[str, Any]) -> Path:
    """Local path of a pretrained config's official file: the 'file' entry itself if it exists, else that file
    name inside $INTERN2_HOME (default ~/.cache/intern2). intern2 never downloads."""
    name = pretrained_cfg.get("file")
    if not name:
        raise ValueError(f"pretrained config {pretrained_cfg.get('architecture')} names no weight file")
    if Path(name).exists():
        return Path(name)
    home = Path(os.environ.get(ENV_HOME, Path.home() / ".cache" / "intern2"))
    candidate = home / Path(name).name
    if candidate.exists():
        return candidate
    hub = pretrained_cfg.get("hf_hub_id")
    raise FileNotFoundError(
        f"pretrained weights {Path(name).name} not found at {candidate}. intern2 does not download: get the "
        f"official file{f' from https://huggingface.co/{hub}' if hub else ''} and put it in {home} (or set "
        f"${ENV_HOME}), or pass checkpoint_path=...")


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: 'arch' or 'arch.tag' (e.g. 'internimage_l.in22k_ft_in1k'); see ``intern2.list_models()``.
        pretrained: load the official weights of the pretrained config (from a local file, see pretrained_file).
        checkpoint_path: load these weights instead (any supported layout).
        features_only: build the dense-prediction backbone returning per-level NCHW maps.
        out_indices: levels returned when features_only.
        pretrained_cfg_overlay: entries overriding the pretrained config (e.g. dict(file=PATH)).
        **kwargs: override architecture config fields (num_classes, depths, channels, drop_path_rate, ...).
    """
    arch, _, tag = name.partition(".")
    builder = get_model_builder(arch)
    if tag:
        kwargs["pretrained_tag"] = tag
    if features_only:
        kwargs.update(features_only=True, out_indices=tuple(out_indices))
    model = builder(**kwargs)
    if pretrained_cfg_overlay:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **pretrained_cfg_overlay}
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    elif pretrained:
        load_checkpoint(model, pretrained_file(model.pretrained_cfg))
    return model


def save_pretrained(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write ``config.json`` + ``model.safetensors``; :func:`from_pretrained` rebuilds the model exactly."""
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}))
    arch = pretrained_cfg.get("architecture")
    if not arch or not hasattr(model, "export_config"):
        raise ValueError("save_pretrained: model was not built by intern2.create_model (no architecture recorded)")
    config = dict(architecture=arch, **model.export_config(),
                  pretrained_cfg={k: v for k, v in pretrained_cfg.items() if k not in ("architecture",)})
    return _save(model, directory, config)


def _hf_model_type(directory: Path) -> Optional[str]:
    """``model_type`` of an HF folder's config.json that names no intern2 architecture."""
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # read_checkpoint reports it
    return None if not isinstance(config, dict) or config.get("architecture") else config.get("model_type")


def from_pretrained(directory: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """Rebuild a model from a folder written by :func:`save_pretrained`, from an OpenGVLab HF-hub InternImage
    folder (config.json with model_type 'intern_image'; no remote code is executed), or from an HF NLLB/M2M-100
    folder (model_type 'm2m_100', e.g. one written by ``TranslationModel.save_pretrained``; ``kwargs`` are its
    ``dtype`` / ``device``)."""
    if _hf_model_type(Path(directory)) == "m2m_100":  # also sharded folders, which read_checkpoint does not read
        from .models.translator import TranslationModel
        return TranslationModel.from_pretrained(directory, **kwargs)
    state, config = read_checkpoint(Path(directory))
    arch = config.get("architecture")
    if arch is None and config.get("model_type") == "intern_image":
        from .models.internimage import InternImage, InternImageConfig
        model = InternImage(**{**InternImageConfig.from_dict(config).to_dict(), **kwargs})
        model.pretrained_cfg = dict(architecture="internimage_custom")
    elif arch and is_model(arch):
        fields = {k: v for k, v in config.items() if k not in ("architecture", "pretrained_cfg")}
        tag = config.get("pretrained_cfg", {}).get("tag")
        model = create_model(f"{arch}.{tag}" if tag else arch, **{**fields, **kwargs})
        model.pretrained_cfg = {**model.pretrained_cfg, **config.get("pretrained_cfg", {})}
    else:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: cannot tell the model: expected an 'architecture' "
                         f"known to intern2 or model_type 'intern_image' or 'm2m_100', "
                         f"got {arch or config.get('model_type')!r}")
    load_checkpoint(model, state, allow_new_head=False)
    return model
