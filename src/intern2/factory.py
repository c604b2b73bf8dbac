"""Public model API: create_model, from_pretrained, save_pretrained (re-exported by ``intern2``)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, read_config, save_pretrained as _save
from .registry import get_model_builder, is_model
from .weights import cfg_for_head

__all__ = ["create_model", "from_pretrained", "save_pretrained", "unwrap_model", "HF_MODEL_TYPES"]

log = logging.getLogger(__name__)


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        features_only: bool = False,
        out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        **kwargs,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: 'arch' or 'arch.tag' (e.g. 'internimage_l.in22k_ft_in1k'); see ``intern2.list_models()``.
        pretrained: load the tag's official weights: its file given as a path, else found in $INTERN2_HOME, else
            in (or, online, downloaded into) the Hugging Face Hub cache (see :mod:`intern2.hub`).
        checkpoint_path: load these weights instead (any supported layout); a classifier of another class count is
            an error unless ``num_classes`` is given (then it is a new head, as with ``pretrained=True``).
        features_only: build the dense-prediction backbone returning per-level NCHW maps.
        out_indices: levels returned when features_only (a sequence, negatives from the end; an int n: the last n).
        pretrained_cfg_overlay: entries overriding the pretrained config (e.g. dict(file=PATH)).
        cache_dir: the Hugging Face cache to use instead of the default (``$HF_HUB_CACHE``).
        **kwargs: override architecture config fields (num_classes, depths, channels, drop_path_rate, ...).
    """
    if not isinstance(name, str):
        raise TypeError(f"create_model: expected a model name such as 'internimage_t', got {type(name).__name__}")
    for key, least in (("num_classes", 0), ("in_chans", 1)):  # 0 classes: no head (timm's features model)
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{key}: expected an integer >= {least}, got {value!r}")
    if "/" in name or os.sep in name or Path(name).exists():  # no registered name is a path
        raise ValueError(f"create_model: {name!r} is a path, not a model name: load a model folder with "
                         f"intern2.from_pretrained({name!r}) (on the command line: --checkpoint {name}), a weight "
                         f"file with create_model(NAME, checkpoint_path=...)")
    arch, _, tag = name.partition(".")
    builder = get_model_builder(arch)
    if tag:
        kwargs["pretrained_tag"] = tag
    if features_only:
        kwargs.update(features_only=True, out_indices=out_indices if isinstance(out_indices, int) else
                      tuple(out_indices))
    model = builder(**kwargs)
    if pretrained_cfg_overlay:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **pretrained_cfg_overlay}
    if checkpoint_path is not None:
        # A new head only where one was asked for: otherwise a random head would answer under the tag's labels.
        load_checkpoint(model, checkpoint_path, allow_new_head="num_classes" in kwargs)
    elif pretrained:
        from .hub import reading_download, resolve_weights
        given = (pretrained_cfg_overlay or {}).get("file")
        if given is not None and not Path(given).exists():  # as in timm, an overlay's file is a local path
            raise FileNotFoundError(f"pretrained_cfg_overlay file {given}: no such file")
        path = resolve_weights(model.pretrained_cfg, cache_dir)
        with reading_download(path):
            load_checkpoint(model, path)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` / DataParallel / DistributedDataParallel wrappers (whose state-dict
    keys carry ``_orig_mod.`` / ``module.``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def save_pretrained(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write ``config.json`` + ``model.safetensors``; :func:`from_pretrained` rebuilds the model exactly (a
    compiled or DataParallel model is saved as the model it wraps)."""
    model = unwrap_model(model)
    # After reset_classifier the old head's class count and labels are stale: the saved ones are the model's.
    pretrained_cfg = cfg_for_head(getattr(model, "pretrained_cfg", {}), getattr(model, "num_classes", None))
    arch = pretrained_cfg.get("architecture")
    if not arch or not hasattr(model, "export_config"):
        raise ValueError("save_pretrained: model was not built by intern2.create_model (no architecture recorded)")
    config = dict(architecture=arch, **model.export_config(),
                  pretrained_cfg={k: v for k, v in pretrained_cfg.items() if k not in ("architecture",)})
    return _save(model, directory, config)


# HF transformers config.json model types that from_pretrained rebuilds (no remote code runs).
HF_MODEL_TYPES = ("internimage", "m2m_100", "videomae")
# An HF VideoMAE head of this many classes is the tag of that dataset (its test protocol and label set).
_VIDEOMAE_TAGS = {400: "k400", 174: "ssv2", 710: "k710_distilled"}


def _hf_videomae(directory: Path, config: Dict[str, Any], kwargs: Dict[str, Any]) -> nn.Module:
    """An HF transformers VideoMAE folder (VideoMAEForVideoClassification / ForPreTraining) as the intern2 model
    that computes what transformers computes; a classifier's head size picks the dataset's test protocol and its
    id2label names the classes."""
    from .models.video_vit import config_from_hf
    from .weights import pretrained_tags
    try:
        name, fields, names = config_from_hf(config)
    except ValueError as exc:
        raise ValueError(f"{directory / CONFIG_NAME}: {exc}") from None
    tag = _VIDEOMAE_TAGS.get(fields.get("num_classes"))
    model = create_model(f"{name}.{tag}" if tag in pretrained_tags(name) else name, **{**fields, **kwargs})
    model.pretrained_cfg = {**model.pretrained_cfg, "file": str(directory),
                            **({"label_names": names} if names and fields.get("num_classes") else {})}
    return model


# An HF image processor's PIL resample code -> the interpolation name of pretrained_cfg
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
HF_PREPROCESSOR_NAME = "preprocessor_config.json"


def _hf_preprocessing(directory: Path) -> Dict[str, Any]:
    """The eval preprocessing an HF folder's ``preprocessor_config.json`` states (the shorter side resized to
    ``size``, a centre crop of ``crop_size``, PIL's ``resample``, ``image_mean`` / ``image_std``) in pretrained_cfg
    keys; {} without the file. Sizes may be ints or transformers' newer dicts (``shortest_edge``, ``height``)."""
    if not (directory / HF_PREPROCESSOR_NAME).is_file():
        return {}
    config = read_config(directory, HF_PREPROCESSOR_NAME)
    where = directory / HF_PREPROCESSOR_NAME

    def pixels(value: Any) -> Any:  # an int, or {"shortest_edge": N} / {"height": N, "width": N}
        return value.get("shortest_edge", value.get("height")) if isinstance(value, dict) else value
    size = pixels(config.get("size"))
    crop = pixels(config.get("crop_size")) if config.get("do_center_crop", True) else None
    crop = size if crop is None else crop
    for field, value in (("size", size), ("crop_size", crop)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # it loaded before this was read
            log.warning("%s: %s %r is not a number of pixels: the folder's preprocessing is not used", where, field,
                        value)
            return {}
    entries: Dict[str, Any] = {"input_size": [3, crop, crop], "crop_pct": crop / size}
    if config.get("resample") is not None:
        if config["resample"] not in _PIL_RESAMPLE:
            raise ValueError(f"{where}: resample: expected one of PIL's codes {sorted(_PIL_RESAMPLE)}, got "
                             f"{config['resample']!r}")
        entries["interpolation"] = _PIL_RESAMPLE[config["resample"]]
    entries.update({key: config[hf_key] for key, hf_key in (("mean", "image_mean"), ("std", "image_std"))
                    if config.get(hf_key) is not None})
    return entries


# timm's save_for_hf layout: reconstruction arguments under model_args, the rest informational or label metadata.
_TIMM_CONFIG_KEYS = ("model_args", "num_features", "global_pool", "label_names", "label_descriptions")


def _model_fields(config: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(architecture fields, label entries for pretrained_cfg) of a folder's config.json: ours lists the fields at
    the top level; timm's (``timm.models.save_for_hf``, ``push_to_hub``) keeps them under ``model_args``."""
    if not any(key in config for key in ("model_args", "num_features")):
        return {k: v for k, v in config.items() if k not in ("architecture", "pretrained_cfg")}, {}
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ValueError(f"config.json: model_args: expected a JSON object, got {model_args!r:.60}")
    rest = {k: v for k, v in config.items() if k not in ("architecture", "pretrained_cfg", *_TIMM_CONFIG_KEYS)}
    labels = {k: config[k] for k in ("label_names", "label_descriptions") if config.get(k)}
    return {**rest, **model_args}, labels


def from_pretrained(directory: Union[str, os.PathLike], weights: bool = True, dtype: Optional[torch.dtype] = None,
                    cache_dir: Optional[Union[str, os.PathLike]] = None, **kwargs) -> nn.Module:
    """Rebuild a model from a folder written by :func:`save_pretrained` or from an HF folder of a model type in
    :data:`HF_MODEL_TYPES` (no remote code is executed): OpenGVLab's HF-hub InternImage ('internimage'), HF
    transformers VideoMAE classifiers and pre-training models ('videomae'), NLLB/M2M-100 ('m2m_100', e.g. one
    written by ``TranslationModel.save_pretrained``; ``kwargs`` are then its ``dtype`` / ``device``).
    ``weights=False`` builds the folder's architecture without loading its weights; ``num_classes`` of another
    count gives a new head (fine-tuning, as timm's ``pretrained=True, num_classes=``). ``dtype`` defaults to
    float32, or bfloat16 for weights saved in bfloat16 (``model.to(torch.bfloat16)`` then ``save_pretrained``
    round-trips, as the translator's HF layout does). ``directory`` may be a Hub repo (``owner/name`` or timm's
    ``hf-hub:owner/name``, e.g. ``OpenGVLab/internimage_t_1k_224``): its snapshot in the Hugging Face cache
    (``cache_dir``, default ``$HF_HUB_CACHE``), downloaded when online, as transformers reads one."""
    from .hub import hub_origin, hub_repo, local_folder
    repo = hub_repo(directory)
    if repo is not None:
        with local_folder(directory, cache_dir=cache_dir, weights=weights) as folder:
            model = from_pretrained(folder, weights=weights, dtype=dtype, **kwargs)
        model.pretrained_cfg = hub_origin(getattr(model, "pretrained_cfg", {}), repo)
        return model
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"{directory} is a file, not a model folder: load a weight file with "
                         f"create_model(NAME, checkpoint_path={str(directory)!r})")
    if not directory.exists():
        name = str(directory)
        hint = ""
        if is_model(name.split(".", 1)[0]):
            hint = f"; {name} is a model name: intern2.create_model({name!r}, pretrained=True) loads official weights"
        raise FileNotFoundError(f"{directory}: no such model folder{hint}")
    config = read_config(directory)
    if not isinstance(config.get("pretrained_cfg", {}), dict):
        raise ValueError(f"{directory / CONFIG_NAME}: pretrained_cfg: expected a JSON object, got "
                         f"{config['pretrained_cfg']!r:.60}")
    arch = config.get("architecture")
    model_type = None if arch else config.get("model_type")
    if model_type == "m2m_100":  # also sharded folders, which read_checkpoint does not read
        from .models.translator import TranslationModel, TranslatorConfig
        if not weights:  # the folder's architecture, freshly initialised: its weight files need not be there
            model = TranslationModel(TranslatorConfig.from_dict(config)).eval()
            return model if dtype is None else model.to(dtype)
        return TranslationModel.from_pretrained(directory, dtype=dtype, **kwargs)
    if not (arch and is_model(arch)) and model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{directory / CONFIG_NAME}: cannot tell the model: expected an 'architecture' known to "
                         f"intern2 or an HF model_type intern2 reads ({', '.join(HF_MODEL_TYPES)}), got "
                         f"{arch or model_type!r}")
    if model_type == "internimage":
        # The registered variant of that width and depth, with its published tag of that class count (L's in22k
        # or in22k_ft_in1k). Else T's name, and no tag's record: every field is given, so what is built and saved
        # is the folder's architecture and save_pretrained writes a folder intern2 reads back, but no published
        # weights or metrics describe it; its preprocessor_config.json, where it has one, gives the input size.
        # OpenGVLab's folders name no classes; a folder whose id2label does (a fine-tune saved by transformers) is
        # not the published weights either.
        from .models.internimage import INTERNIMAGE_VARIANTS, InternImageConfig
        from .weights import get_weights, hf_label_names, is_placeholder_labels, pretrained_tags
        fields = InternImageConfig.from_dict(config).to_dict()
        try:
            names = hf_label_names(config)
        except ValueError as exc:
            raise ValueError(f"{directory / CONFIG_NAME}: {exc}") from None
        # transformers writes its 2-class default id2label into configs that never set num_labels
        own_names = names if names and len(names) == fields["num_classes"] and not is_placeholder_labels(names) \
            else None
        if names and len(names) not in (2, fields["num_classes"]):  # 2: the default of a config that set no labels
            log.warning("%s: id2label names %d classes but num_classes is %d: its names are not used",
                        directory / CONFIG_NAME, len(names), fields["num_classes"])
        name = next((name for name, variant in INTERNIMAGE_VARIANTS.items() if variant.channels == fields["channels"]
                     and tuple(variant.depths) == tuple(fields["depths"])), None)
        tag = next((tag for tag in pretrained_tags(name) if get_weights(name, tag).pretrained_cfg().get(
            "num_classes") == fields["num_classes"]), None) if name and own_names is None else None
        model = create_model(f"{name}.{tag}" if tag else name or "internimage_t", **{**fields, **kwargs})
        cfg = model.pretrained_cfg
        if tag is None:  # the folder's own preprocessing, where it states one
            record_only = ("tag", "metrics", "label_descriptions", "hf_hub_id", "hf_hub_filename", "url")
            cfg = cfg_for_head({k: v for k, v in cfg.items() if k not in record_only}, fields["num_classes"])
            cfg = {**cfg, **_hf_preprocessing(directory)}
        model.pretrained_cfg = {**cfg, "file": str(directory), **({"label_names": own_names} if own_names else {})}
    elif model_type == "videomae":
        model = _hf_videomae(directory, config, kwargs)
    else:
        fields, labels = _model_fields(config)
        tag = config.get("pretrained_cfg", {}).get("tag")
        model = create_model(f"{arch}.{tag}" if tag else arch, **{**fields, **kwargs})
        # Metrics and label descriptions are the folder's own or none: a model trained from the tag dropped the
        # tag's (weights.trained_cfg), and they must not come back from its record.
        tag_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("metrics", "label_descriptions")}
        model.pretrained_cfg = cfg_for_head({**tag_cfg, **config.get("pretrained_cfg", {}), **labels},
                                            getattr(model, "num_classes", None))
    if weights:
        load_checkpoint(model, directory, allow_new_head="num_classes" in kwargs)
    if dtype is None and weights and _saved_dtype(directory) == torch.bfloat16:  # float16 files load as float32
        dtype = torch.bfloat16
    return model if dtype in (None, torch.float32) else model.to(dtype)


def _saved_dtype(directory: Path) -> Optional[torch.dtype]:
    """The floating dtype of a folder's safetensors weights (None: another file, or no floating tensor)."""
    from safetensors import safe_open
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                     "F64": torch.float64}.get(handle.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return None
