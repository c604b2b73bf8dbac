"""Weights metadata: for every pretrained tag, where its file is published, how the official evaluation
prepares its input, what its outputs are called, and what it scored (with the source of the number).

torchvision's ``Weights`` is the model: one frozen :class:`Weights` record per ``architecture.tag``. A model
built by :func:`intern2.create_model` carries its record as the plain dict ``model.pretrained_cfg`` (what a
model folder's ``config.json`` stores, in timm's key names where timm has one); :func:`protocol_from_cfg` and
:func:`labels_from_cfg` read that dict back into the typed protocol and the class names, checking every field.
Every door (Python, CLI, HTTP) reads them through :mod:`intern2.pipelines`, never from the dict itself.

Label sets come from a dependency where one ships them (torchvision: ImageNet-1k, COCO, Kinetics-400; timm:
ImageNet-22k) and otherwise from ``data/labels/*.txt`` in this package (ADE20K, Kinetics-710, Something-Something
v2; sources and how their order was checked in ``data/labels/SOURCES.md``).
This module imports neither torch nor the models, so listing tags stays cheap.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from .fields import coerce, describe

log = logging.getLogger(__name__)

__all__ = ["Metric", "ImageClassificationProtocol", "SegmentationProtocol", "DetectionProtocol", "VideoProtocol",
           "TranslationProtocol", "TemporalLocalizationProtocol", "Weights", "get_weights", "list_pretrained",
           "pretrained_tags", "task_of", "label_set", "LABEL_SETS", "protocol_from_cfg", "labels_from_cfg",
           "cfg_for_head", "TASKS", "PROTOCOLS"]

# The largest image or frame side a protocol may ask for (the official protocols stay under 4096, TTA included).
MAX_SIDE = 8192
TASKS = ("image-cls", "segment", "detect", "video-cls", "video-pretrain", "video-text", "translation", "tal")
Pair = Tuple[int, int]


class _Protocol:
    """A frozen evaluation protocol stored as flat keys of ``pretrained_cfg`` (its field names)."""

    task: str = ""
    _aliases: Dict[str, str] = {}  # key written by older intern2 versions -> field

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], where: str = "pretrained_cfg") -> "_Protocol":
        """Read the protocol's fields from ``cfg`` (absent ones keep their defaults); a value of the wrong type
        or out of range is a ValueError naming ``where`` and the key."""
        cfg = {**{new: cfg[old] for old, new in cls._aliases.items() if old in cfg and new not in cfg}, **cfg}
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in cfg:
                try:
                    values[f.name] = coerce(cfg[f.name], hints[f.name])
                except TypeError:
                    raise ValueError(f"{where}: {f.name}: expected {describe(hints[f.name])}, "
                                     f"got {cfg[f.name]!r}") from None
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def to_cfg(self) -> Dict[str, Any]:
        """The protocol as ``pretrained_cfg`` keys (JSON-ready: tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "_Protocol":
        """A copy with ``changes`` (None values are ignored: an option the user did not give), each checked as
        :meth:`from_cfg` checks a stored value (``test_size=5`` is a ValueError naming the field)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown {self.task} protocol options {unknown}; known: {sorted(names)}")
        given = {k: v for k, v in changes.items() if v is not None}
        return type(self).from_cfg({**dataclasses.asdict(self), **given}, "options") if given else self

    @staticmethod
    def _check(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    def _check_normalisation(self) -> None:
        """``mean`` and ``std`` are three finite numbers per channel, ``std`` positive (a zero divides by zero)."""
        for name in ("mean", "std"):
            values = getattr(self, name)
            self._check(len(values) == 3 and all(math.isfinite(v) for v in values),
                        f"{name}: expected 3 finite numbers (R, G, B), got {list(values)}")
        self._check(min(self.std) > 0, f"std: expected positive numbers, got {list(self.std)}")

    def _check_pixels(self, *names: str) -> None:
        """The named sizes (ints, pairs or None) are at most :data:`MAX_SIDE` pixels: beyond it a typo asks the
        allocator for hundreds of gigabytes."""
        for name in names:
            value = getattr(self, name)
            values = value if isinstance(value, (tuple, list)) else () if value is None else (value,)
            self._check(max(values, default=0) <= MAX_SIDE,
                        f"{name}: expected at most {MAX_SIDE} pixels, got {value}")


CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes


@dataclass(frozen=True)
class ImageClassificationProtocol(_Protocol):
    """timm's eval transform: resize to ``floor(input_size / crop_pct)`` (``interpolation``; ``crop_mode``
    ``center``: the shorter side, ``squash``: both sides, ``border``: the longer side), then centre crop (or, for
    ``border``, pad with the mean colour) to ``input_size``, normalise."""
    task = "image-cls"
    input_size: Tuple[int, int, int] = (3, 224, 224)  # timm's (C, H, W)
    crop_pct: float = 1.0
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        self._check(min(self.input_size) >= 1, f"input_size: expected positive sizes, got {self.input_size}")
        self._check(0 < self.crop_pct <= 1, f"crop_pct: expected a number in (0, 1], got {self.crop_pct}")
        self._check(self.crop_mode in CROP_MODES,
                    f"crop_mode: expected one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        self._check(self.interpolation in ("bicubic", "bilinear", "nearest"),
                    f"interpolation: expected bicubic, bilinear or nearest, got {self.interpolation!r}")
        self._check_pixels("input_size")
        self._check_normalisation()

    @property
    def img_size(self) -> int:
        return self.input_size[-1]


@dataclass(frozen=True)
class SegmentationProtocol(_Protocol):
    """mmseg's test pipeline: keep-ratio resize into ``test_size`` (long, short bound; mmseg's ``img_scale``),
    then a resize (not a pad) to a multiple of ``size_divisor`` (``ResizeToMultiple``), normalise; whole-image
    inference, or sliding windows of ``slide_crop`` (h, w) every ``slide_stride``; logits resized back to the
    image. Test-time augmentation (the published "ms" numbers): the same at each of ``tta_ratios`` x
    ``test_size``, with horizontal flips when ``tta_flip``, softmax probabilities averaged."""
    task = "segment"
    _aliases = {"test_scale": "test_size"}
    test_size: Pair = (2048, 512)
    size_divisor: Optional[int] = 32
    slide_crop: Optional[Pair] = None
    slide_stride: Optional[Pair] = None
    tta_ratios: Tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    tta_flip: bool = True
    reduce_zero_label: bool = False
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        self._check(min(self.test_size) >= 1, f"test_size: expected positive sizes, got {self.test_size}")
        self._check(self.size_divisor is None or self.size_divisor >= 1,
                    f"size_divisor: expected a positive integer or null, got {self.size_divisor}")
        for name in ("slide_crop", "slide_stride"):
            value = getattr(self, name)
            self._check(value is None or min(value) >= 1, f"{name}: expected positive sizes, got {value}")
        self._check(self.slide_stride is None or self.slide_crop is not None, "slide_stride: needs slide_crop")
        self._check(self.slide_stride is None or all(s <= c for s, c in zip(self.slide_stride, self.slide_crop)),
                    f"slide_stride: expected at most the window {self.slide_crop} (pixels between windows would get "
                    f"no prediction), got {self.slide_stride}")
        self._check(len(self.tta_ratios) >= 1 and min(self.tta_ratios) > 0,
                    f"tta_ratios: expected positive ratios, got {self.tta_ratios}")
        self._check_pixels("test_size", "size_divisor", "slide_crop", "slide_stride")
        self._check_normalisation()
        largest = max(self.test_size) * max(self.tta_ratios)  # the largest scale test-time augmentation resizes to
        self._check(largest <= MAX_SIDE, f"tta_ratios: {max(self.tta_ratios)} x test_size {self.test_size} is "
                    f"{largest:.0f} pixels, more than {MAX_SIDE}")

    @property
    def stride(self) -> Optional[Pair]:
        """The sliding-window stride: ``slide_stride``, else two thirds of the window (mmseg's usual)."""
        if self.slide_crop is None:
            return None
        return self.slide_stride or (max(1, self.slide_crop[0] * 2 // 3), max(1, self.slide_crop[1] * 2 // 3))


@dataclass(frozen=True)
class DetectionProtocol(_Protocol):
    """mmdet's test pipeline: keep-ratio resize into ``test_size`` (long, short), normalise, zero-pad the
    batch to a multiple of ``size_divisor``; boxes and masks are returned at the image's own size."""
    task = "detect"
    test_size: Pair = (1333, 800)
    size_divisor: int = 32
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        self._check(min(self.test_size) >= 1, f"test_size: expected positive sizes, got {self.test_size}")
        self._check(self.size_divisor >= 1, f"size_divisor: expected a positive integer, got {self.size_divisor}")
        self._check_pixels("test_size", "size_divisor")
        self._check_normalisation()


SAMPLINGS = ("dense", "segment", "uniform")


@dataclass(frozen=True)
class VideoProtocol(_Protocol):
    """Which frames make a test view and how they are cropped.

    * ``dense`` (VideoMAE on Kinetics): ``num_frames`` frames ``stride`` apart; ``test_clips`` windows spread
      from the first to the last possible start (VideoMAE's test); one clip: the middle window.
    * ``segment`` (TSN, VideoMAE on Something-Something): ``num_frames`` equal segments, one frame each; view k of
      ``test_clips`` takes the frame at k / test_clips of each segment (VideoMAE's SSv2 test); one view: the
      segment middles.
    * ``uniform`` (the InternVideo-MM demo): ``num_frames`` frames evenly spaced from the first to the last.

    Frames: shorter side to ``short_side`` (default ``img_size``; bilinear, ``antialias`` as PIL's filter, off as
    the cv2 resize of VideoMAE's test), then ``test_crops`` crops of ``img_size`` (1: centred; 3: along the longer
    side), normalised with ``mean``/``std``; class probabilities (or features) are averaged over the views.
    """
    task = "video-cls"
    num_frames: int = 16
    sampling: str = "dense"
    stride: int = 4
    test_clips: int = 1
    test_crops: int = 1
    img_size: int = 224
    short_side: Optional[int] = None
    antialias: bool = True
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], where: str = "pretrained_cfg") -> "VideoProtocol":
        input_size = cfg.get("input_size")
        if "img_size" not in cfg and isinstance(input_size, (list, tuple)) and len(input_size) == 4:
            cfg = {**cfg, "img_size": input_size[-1]}  # folders written before img_size was a key
        return super().from_cfg(cfg, where)

    def __post_init__(self):
        self._check(self.sampling in SAMPLINGS, f"sampling: expected one of {list(SAMPLINGS)}, "
                    f"got {self.sampling!r}")
        for name in ("num_frames", "stride", "test_clips", "img_size"):
            self._check(getattr(self, name) >= 1, f"{name}: expected a positive integer, got {getattr(self, name)}")
        self._check(self.test_crops in (1, 3), f"test_crops: expected 1 or 3, got {self.test_crops}")
        self._check(self.short_side is None or self.short_side >= self.img_size,
                    f"short_side: expected at least the crop, img_size {self.img_size}, got {self.short_side}")
        self._check(self.sampling != "uniform" or self.test_clips == 1,
                    f"test_clips: expected 1 with sampling 'uniform' (one view per video), got {self.test_clips}")
        self._check_pixels("img_size", "short_side")
        self._check_normalisation()

    def to_cfg(self) -> Dict[str, Any]:
        return {**super().to_cfg(), "input_size": [3, self.num_frames, self.img_size, self.img_size]}


@dataclass(frozen=True)
class VideoTextProtocol(VideoProtocol):
    """:class:`VideoProtocol` of a video-text model (its default: the InternVideo-MM demo's 8 uniform frames,
    shorter side 256, centre crop 224, CLIP's normalisation)."""
    task = "video-text"
    num_frames: int = 8
    sampling: str = "uniform"
    stride: int = 1
    short_side: Optional[int] = 256
    mean: Tuple[float, float, float] = CLIP_MEAN
    std: Tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class TranslationProtocol(_Protocol):
    """Decoding defaults: beam size, and new tokens per sentence (None: 2 x source length + 10)."""
    task = "translation"
    num_beams: int = 4
    max_new_tokens: Optional[int] = None

    def __post_init__(self):
        self._check(self.num_beams >= 1, f"num_beams: expected a positive integer, got {self.num_beams}")
        self._check(self.max_new_tokens is None or self.max_new_tokens >= 1,
                    f"max_new_tokens: expected a positive integer or null, got {self.max_new_tokens}")


TIOU_PROTOCOLS = ("thumos14", "activitynet")  # their thresholds: intern2.tasks.tal.TIOU_PRESETS


@dataclass(frozen=True)
class TemporalLocalizationProtocol(_Protocol):
    """The snippet features a localizer reads and how it is scored: feature i covers the ``feat_num_frames``
    frames from ``i * feat_stride`` (InternVideo's THUMOS14 features: 16 frames every 4; ActivityNet: every 16),
    at the annotation's fps unless ``default_fps`` is set; mAP at the temporal-IoU thresholds of ``tiou``
    (``thumos14`` 0.3:0.7, ``activitynet`` 0.5:0.95). ``feature_dim`` is the features' channel count."""
    task = "tal"
    feat_stride: int = 4
    feat_num_frames: int = 16
    default_fps: Optional[float] = None
    tiou: str = "thumos14"

    def __post_init__(self):
        for name in ("feat_stride", "feat_num_frames"):
            self._check(getattr(self, name) >= 1, f"{name}: expected a positive integer, got {getattr(self, name)}")
        self._check(self.default_fps is None or self.default_fps > 0,
                    f"default_fps: expected a positive number or null, got {self.default_fps}")
        self._check(self.tiou in TIOU_PROTOCOLS, f"tiou: expected one of {list(TIOU_PROTOCOLS)}, got {self.tiou!r}")


PROTOCOLS = {"image-cls": ImageClassificationProtocol, "segment": SegmentationProtocol, "detect": DetectionProtocol,
             "video-cls": VideoProtocol, "video-pretrain": VideoProtocol, "video-text": VideoTextProtocol,
             "translation": TranslationProtocol, "tal": TemporalLocalizationProtocol}
Protocol = Union[ImageClassificationProtocol, SegmentationProtocol, DetectionProtocol, VideoProtocol,
                 TranslationProtocol, TemporalLocalizationProtocol]


# ---------------------------------------------------------------------------------------------------- labels
def _torchvision_categories(weights: str, drop: Sequence[str] = ()) -> List[str]:
    import torchvision.models as tvm
    enum_name, member = weights.rsplit(".", 1)
    module = tvm
    for part in enum_name.split(".")[:-1]:
        module = getattr(module, part)
    categories = getattr(getattr(module, enum_name.split(".")[-1]), member).meta["categories"]
    return [c for c in categories if c not in drop]


def _timm_imagenet22k() -> List[str]:
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        raise ImportError("the ImageNet-22k class names come from timm: pip install 'intern2[timm]'") from None
    info = ImageNetInfo("imagenet-22k")
    return [info.index_to_description(i) for i in range(info.num_classes())]


def _package_file(name: str) -> List[str]:
    path = Path(__file__).parent / "data" / "labels" / f"{name}.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


@dataclass(frozen=True)
class LabelSet:
    """A named list of class names: how many, where they come from, and how to read them."""
    name: str
    size: int
    source: str
    load: Callable[[], List[str]] = field(repr=False, compare=False)


LABEL_SETS: Dict[str, LabelSet] = {s.name: s for s in (
    LabelSet("imagenet-1k", 1000, "torchvision (ResNet50_Weights.IMAGENET1K_V1.meta['categories'])",
             lambda: _torchvision_categories("ResNet50_Weights.IMAGENET1K_V1")),
    LabelSet("imagenet-22k", 21841, "timm (ImageNetInfo('imagenet-22k'): WordNet lemmas, sorted synset order)",
             _timm_imagenet22k),
    LabelSet("coco", 80, "torchvision (MaskRCNN_ResNet50_FPN_Weights.COCO_V1 categories without '__background__' "
             "and 'N/A': mmdet's CocoDataset.CLASSES order)",
             lambda: _torchvision_categories("detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
                                             ("__background__", "N/A"))),
    LabelSet("ade20k", 150, "intern2 data/labels/ade20k.txt (mmseg ADE20KDataset.CLASSES)",
             lambda: _package_file("ade20k")),
    *(LabelSet(name, size, f"intern2 data/labels/{name.replace('-', '_')}.txt ({source})",
               functools.partial(_package_file, name.replace("-", "_")))
      for name, size, source in (("cityscapes", 19, "mmseg CityscapesDataset classes"),
                                 ("coco-stuff", 171, "mmseg COCOStuffDataset.CLASSES"),
                                 ("nyu-depth-v2", 40, "InternImage mmseg_custom NYUDepthV2Dataset.CLASSES"),
                                 ("pascal-context-59", 59, "mmseg PascalContextDataset59.CLASSES"))),
    LabelSet("kinetics-400", 400, "torchvision (R3D_18_Weights.KINETICS400_V1.meta['categories'])",
             lambda: _torchvision_categories("video.R3D_18_Weights.KINETICS400_V1")),
    LabelSet("kinetics-710", 710, "intern2 data/labels/kinetics710.txt (VideoMAEv2 misc/label_map_k710.txt)",
             lambda: _package_file("kinetics710")),
    LabelSet("ssv2", 174, "intern2 data/labels/ssv2.txt (something-something-v2-labels.json id order)",
             lambda: _package_file("ssv2")),
)}


@functools.lru_cache(maxsize=None)
def label_set(name: str) -> Tuple[str, ...]:
    """The class names of a known label set (e.g. 'coco'); a KeyError lists the known sets."""
    if name not in LABEL_SETS:
        raise KeyError(f"unknown label set {name!r}; known: {sorted(LABEL_SETS)}")
    names = tuple(LABEL_SETS[name].load())
    if len(names) != LABEL_SETS[name].size:
        raise RuntimeError(f"label set {name}: expected {LABEL_SETS[name].size} names, read {len(names)}")
    return names


def imagenet_wordnet_ids(names: Sequence[str]) -> Optional[List[str]]:
    """The WordNet ids (``n01440764``, ...) of ``names`` in their order when they are an ImageNet label set
    (ImageNet-1k, ImageNet-22k), else None. ImageNet's folders are named by them; timm ships the lists."""
    for set_name in ("imagenet-1k", "imagenet-22k"):
        if len(names) == LABEL_SETS[set_name].size and tuple(names) == label_set(set_name):
            try:
                from timm.data import ImageNetInfo
            except ImportError:
                raise ImportError(f"the {set_name} WordNet ids come from timm: pip install 'intern2[timm]'") from None
            return list(ImageNetInfo(set_name).label_names())
    return None


def cfg_for_head(cfg: Mapping[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
    """``cfg`` for a model with ``num_classes`` outputs: the label names and published metrics of another class
    count are not its own, so they are left out (as timm drops a source's labels on export)."""
    if num_classes is None or cfg.get("num_classes") in (None, num_classes):
        return {**cfg, **({"num_classes": num_classes} if num_classes is not None else {})}
    return {**{k: v for k, v in cfg.items() if k not in ("label_names", "metrics")}, "num_classes": num_classes}


def fresh_head_cfg(cfg: Mapping[str, Any], num_classes: int) -> Dict[str, Any]:
    """``cfg`` after ``reset_classifier(num_classes)``: a new random head has no class names or published
    metrics, whatever its class count (the tag's 1000 ImageNet names would label a random head)."""
    return {**{k: v for k, v in cfg.items() if k not in ("label_names", "label_descriptions", "metrics")},
            "num_classes": num_classes}


def trained_cfg(cfg: Mapping[str, Any], entries: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``pretrained_cfg`` of a model a training run produced: ``entries`` (its classes, protocol) over ``cfg``,
    without a local file, the published metrics or label descriptions (they describe the weights it started from,
    not these)."""
    return {**{k: v for k, v in cfg.items() if k not in ("metrics", "label_descriptions")}, "file": None,
            **entries}


def hf_label_names(config: Mapping[str, Any]) -> Optional[List[str]]:
    """The class names of an HF ``config.json``'s ``id2label`` in index order, or None without one (a ValueError
    naming the field when it is not an index -> name object). Keys may be ints, as ``PretrainedConfig.to_dict``
    keeps them. transformers' placeholders (``LABEL_0``, ...) are names too: HF's pipelines show them."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label: expected an object mapping class indices to names, got "
                         f"{type(id2label).__name__}")
    names = {}
    for key, name in id2label.items():
        index = key if isinstance(key, int) and not isinstance(key, bool) else \
            int(key) if isinstance(key, str) and key.isascii() and key.isdecimal() and str(int(key)) == key else None
        if index is None or not 0 <= index < len(id2label):
            raise ValueError(f"id2label: key {key!r}: expected the class indices 0..{len(id2label) - 1}")
        if not isinstance(name, str):
            raise ValueError(f"id2label: {key!r}: expected a class name, got {name!r:.40}")
        names[index] = name
    if len(names) != len(id2label):  # 1 and "1"
        raise ValueError(f"id2label: an index given twice; expected the class indices 0..{len(id2label) - 1}")
    return [names[i] for i in range(len(names))]


def is_placeholder_labels(names: Sequence[str]) -> bool:
    """Whether ``names`` are transformers' defaults (``LABEL_0``, ``LABEL_1``, ...): no one chose them."""
    return list(names) == [f"LABEL_{i}" for i in range(len(names))]


def labels_from_cfg(cfg: Mapping[str, Any], num_classes: int, where: str = "pretrained_cfg") -> List[str]:
    """Class names of a model with ``num_classes`` outputs: ``cfg['label_names']`` (a label set's name or a
    list), else (or when the head was replaced by one of another size) the class indices as strings."""
    names = cfg.get("label_names")
    if isinstance(names, str):
        if names not in LABEL_SETS:
            raise ValueError(f"{where}: label_names: unknown label set {names!r}; known: {sorted(LABEL_SETS)}, "
                             f"or a list of class names")
        if LABEL_SETS[names].size == num_classes:
            return list(label_set(names))
        size = LABEL_SETS[names].size
    elif isinstance(names, (list, tuple)):
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: label_names: expected a list of strings")
        if len(names) == num_classes:
            return list(names)
        size = len(names)
    elif names is not None:
        raise ValueError(f"{where}: label_names: expected a label set name or a list of class names, "
                         f"got {type(names).__name__}")
    if names is not None and num_classes:  # e.g. a head replaced after the names were recorded
        log.warning("%s: label_names has %d names but the model has %d classes: classes are named by index",
                    where, size, num_classes)
    return [str(i) for i in range(num_classes)]


# ------------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Metric:
    """A published result of a checkpoint: the figure, on what data, under which protocol, and where it is
    stated."""
    name: str
    value: float
    dataset: str
    protocol: str
    source: str


@dataclass(frozen=True)
class Weights:
    """One pretrained tag: the architecture it fits (``arch_overrides``: config fields the checkpoint needs),
    its official file and where it is published (a Hub repo, else a URL), evaluation protocol, label set and
    published metrics. ``tag`` None is an architecture's defaults (no published weights). A ``file`` that is an HF
    folder (NLLB, the HF VideoMAE conversions) is looked up by that folder name."""
    architecture: str
    tag: Optional[str]
    task: str
    protocol: Protocol
    num_classes: Optional[int] = None
    labels: Optional[str] = None
    file: Optional[str] = None
    hf_hub_id: Optional[str] = None
    url: Optional[str] = None  # where the file is published when it is not on the Hugging Face Hub
    arch_overrides: Mapping[str, Any] = field(default_factory=dict)
    metrics: Tuple[Metric, ...] = ()
    classifier: Optional[str] = None  # timm's names: the head module (dropped for num_classes=0) ...
    first_conv: Optional[str] = None  # ... and the input convolution (adapted for in_chans != 3)
    extra: Mapping[str, Any] = field(default_factory=dict)  # other timm keys of the family (pool_size)

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}" if self.tag else self.architecture

    def pretrained_cfg(self, **extra: Any) -> Dict[str, Any]:
        """The plain dict a model built with these weights carries as ``model.pretrained_cfg``."""
        # timm's keys: ``file`` is a local path (None until one is given), ``hf_hub_filename`` the published name.
        cfg = dict(architecture=self.architecture, tag=self.tag, task=self.task, file=None,
                   hf_hub_filename=self.file, hf_hub_id=self.hf_hub_id, url=self.url, num_classes=self.num_classes,
                   label_names=self.labels, classifier=self.classifier, first_conv=self.first_conv,
                   **self.protocol.to_cfg())
        if self.metrics:
            cfg["metrics"] = [dataclasses.asdict(m) for m in self.metrics]
        return {**cfg, **self.extra, **extra}


_WEIGHTS: Dict[str, List[Weights]] = {}
# Architecture name prefix -> task, for names that have no record (e.g. a folder of an unknown variant).
_TASK_PREFIXES = (("internimage_", "image-cls"), ("upernet_", "segment"), ("mask_rcnn_", "detect"),
                  ("cascade_mask_rcnn_", "detect"), ("dino_", "detect"), ("mask2former_", "segment"),
                  ("videomae_pretrain_", "video-pretrain"), ("videomae_vit_", "video-cls"),
                  ("internvideo_mm_", "video-text"), ("intern2_mt_", "translation"), ("m2m_100", "translation"),
                  ("actionformer_", "tal"))


def _add(*records: Weights) -> None:
    for record in records:
        known = _WEIGHTS.setdefault(record.architecture, [])
        if any(r.tag == record.tag for r in known):
            raise ValueError(f"weights {record.name} are listed twice")
        known.append(record)


def task_of(architecture: str) -> Optional[str]:
    """The task of an architecture name ('upernet_internimage_t' -> 'segment'), None when unknown."""
    if architecture in _WEIGHTS:
        return _WEIGHTS[architecture][0].task
    return next((task for prefix, task in _TASK_PREFIXES if architecture.startswith(prefix)), None)


def pretrained_tags(architecture: str) -> List[str]:
    """The published tags of an architecture, the default first."""
    return [r.tag for r in _WEIGHTS.get(architecture, []) if r.tag]


def get_weights(architecture: str, tag: Optional[str] = None) -> Weights:
    """The record of ``architecture.tag``; without a tag, the architecture's default (its first published tag,
    else its defaults). An unknown tag is a ValueError listing the known ones."""
    records = _WEIGHTS.get(architecture)
    if not records:
        raise KeyError(f"no weights metadata for architecture {architecture!r}")
    if tag is None:
        return next((r for r in records if r.tag), records[0])
    for record in records:
        if record.tag == tag:
            return record
    raise ValueError(f"unknown pretrained tag {tag!r} for {architecture}; known: {pretrained_tags(architecture)}")


def list_pretrained(pattern: Optional[str] = None) -> List[str]:
    """Every published ``architecture.tag``, sorted, optionally filtered by a shell pattern ('internimage_*')."""
    names = sorted(r.name for records in _WEIGHTS.values() for r in records if r.tag)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def protocol_from_cfg(cfg: Mapping[str, Any], task: str, where: str = "pretrained_cfg") -> Protocol:
    """The typed evaluation protocol of ``task`` from a ``pretrained_cfg`` dict (missing keys: defaults)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(cfg).__name__}")
    return PROTOCOLS[task].from_cfg(cfg, where)


# ------------------------------------------------------------------------------------------------- records
_IMAGENET_README = "OpenGVLab/InternImage classification/README.md"
_ADE_README = "OpenGVLab/InternImage segmentation/configs/ade20k/README.md"
_COCO_README = "OpenGVLab/InternImage detection/configs/coco/README.md"
_INTERNIMAGE_HUB = "OpenGVLab/InternImage"


def _imagenet(arch: str, tag: str, file: str, size: int, top1: Optional[float], classes: int = 1000) -> Weights:
    metrics = (Metric("top1", top1, "ImageNet-1k val", f"{size}x{size}, 1 crop", _IMAGENET_README),) if top1 else ()
    stride = 16 if arch in ("internimage_h", "internimage_g") else 32  # H/G pool the fused level-2/3 map
    return Weights(arch, tag, "image-cls", ImageClassificationProtocol(input_size=(3, size, size)),
                   num_classes=classes, labels="imagenet-1k" if classes == 1000 else "imagenet-22k", file=file,
                   hf_hub_id=_INTERNIMAGE_HUB, metrics=metrics, classifier="head", first_conv="patch_embed.conv1",
                   extra=dict(pool_size=(size // stride, size // stride), fixed_input_size=False))


_add(
    _imagenet("internimage_t", "in1k", "internimage_t_1k_224.pth", 224, 83.5),
    _imagenet("internimage_s", "in1k", "internimage_s_1k_224.pth", 224, 84.2),
    _imagenet("internimage_b", "in1k", "internimage_b_1k_224.pth", 224, 84.9),
    _imagenet("internimage_l", "in22k_ft_in1k", "internimage_l_22kto1k_384.pth", 384, 87.7),
    _imagenet("internimage_l", "in22k", "internimage_l_22k_192to384.pth", 384, None, classes=21841),
    _imagenet("internimage_xl", "in22k_ft_in1k", "internimage_xl_22kto1k_384.pth", 384, 88.0),
    _imagenet("internimage_xl", "in22k", "internimage_xl_22k_192to384.pth", 384, None, classes=21841),
    _imagenet("internimage_h", "in22k_ft_in1k", "internimage_h_22kto1k_640.pth", 640, 89.6),
    _imagenet("internimage_g", "in22k_ft_in1k", "internimage_g_22kto1k_512.pth", 512, 90.1),
)


def _ade20k(arch: str, crop: int, test_size: Pair, miou: Tuple[float, float]) -> Weights:
    """The official ADE20K UperNet: trained on ``crop`` crops, tested with ``img_scale=test_size``."""
    where = f"{test_size[0]}x{test_size[1]} keep-ratio, resize to x32"
    metrics = (Metric("mIoU", miou[0], "ADE20K val", f"single-scale ({where})", _ADE_README),
               Metric("mIoU", miou[1], "ADE20K val", "multi-scale + flip (--tta)", _ADE_README))
    return Weights(arch, "ade20k", "segment", SegmentationProtocol(test_size=test_size, reduce_zero_label=True),
                   num_classes=150, labels="ade20k", file=f"{arch}_{crop}_160k_ade20k.pth",
                   hf_hub_id=_INTERNIMAGE_HUB, metrics=metrics)


_add(
    _ade20k("upernet_internimage_t", 512, (2048, 512), (47.9, 48.1)),
    _ade20k("upernet_internimage_s", 512, (2048, 512), (50.1, 50.9)),
    _ade20k("upernet_internimage_b", 512, (2048, 512), (50.8, 51.3)),
    _ade20k("upernet_internimage_l", 640, (2560, 640), (53.9, 54.1)),
    _ade20k("upernet_internimage_xl", 640, (2560, 640), (55.0, 55.3)),
    _ade20k("upernet_internimage_h", 896, (3584, 896), (59.9, 60.3)),
)


# The Cityscapes / Mapillary / NYU / Pascal Context checkpoints have the smaller head (feat 256, 100 queries).
_M2F_SMALL_HEAD = dict(feat_channels=256, num_queries=100, num_heads=8, encoder_feedforward=1024,
                       decoder_feedforward=2048, num_feats=128)
_SEG_README = "OpenGVLab/InternImage segmentation/configs/{}/README.md"


def _m2f(tag: str, file: str, labels: str, protocol: SegmentationProtocol, miou: Optional[Tuple[float, ...]],
         dataset: str, small_head: bool = False) -> Weights:
    """An official Mask2Former-InternImage-H checkpoint (``miou``: single-scale, and multi-scale where the
    released configs give its ratios)."""
    size = LABEL_SETS[labels].size
    where = f"{protocol.test_size[0]}x{protocol.test_size[1]} keep-ratio, resize to x32" + (
        f", slide {protocol.slide_crop[0]}x{protocol.slide_crop[1]}" if protocol.slide_crop else "")
    readme = _SEG_README.format(tag.replace("-", "_").removesuffix("_59"))
    metrics = ()
    if miou:
        metrics = (Metric("mIoU", miou[0], dataset, f"single-scale ({where})", readme),) + tuple(
            Metric("mIoU", value, dataset, "multi-scale + flip (--tta)", readme) for value in miou[1:])
    return Weights("mask2former_internimage_h", tag, "segment", protocol, num_classes=size, labels=labels,
                   file=file, hf_hub_id=_INTERNIMAGE_HUB, metrics=metrics,
                   arch_overrides=dict(_M2F_SMALL_HEAD if small_head else {}, num_classes=size))


_add(
    _m2f("ade20k", "mask2former_internimage_h_896_80k_cocostuff2ade20k.pth", "ade20k",
         SegmentationProtocol(test_size=(3584, 896), reduce_zero_label=True,
                              tta_ratios=(768 / 896, 832 / 896, 1.0, 960 / 896, 1024 / 896)), (62.6, 62.9),
         "ADE20K val"),
    _m2f("cityscapes", "mask2former_internimage_h_1024x1024_80k_mapillary2cityscapes.pth", "cityscapes",
         SegmentationProtocol(test_size=(2048, 1024), slide_crop=(1024, 1024), slide_stride=(512, 512)),
         (86.37,), "Cityscapes val", small_head=True),
    _m2f("mapillary", "mask2former_internimage_h_896x896_80k_mapillary.pth", "cityscapes",
         SegmentationProtocol(test_size=(2048, 1024), slide_crop=(896, 896), slide_stride=(512, 512)), None,
         "Cityscapes val", small_head=True),
    _m2f("coco-stuff164k", "mask2former_internimage_h_896_80k_cocostuff164k.pth", "coco-stuff",
         SegmentationProtocol(test_size=(3584, 896)), (52.6,), "COCO-Stuff-164k val"),
    _m2f("coco-stuff10k", "mask2former_internimage_h_512_40k_cocostuff164k_to_10k.pth", "coco-stuff",
         SegmentationProtocol(test_size=(2048, 512), reduce_zero_label=True), (59.2,), "COCO-Stuff-10k test"),
    _m2f("nyu-depth-v2", "mask2former_internimage_h_480_40k_nyu.pth", "nyu-depth-v2",
         SegmentationProtocol(test_size=(640, 480), reduce_zero_label=True), (67.1,), "NYU-Depth-v2 test",
         small_head=True),
    _m2f("pascal-context-59", "mask2former_internimage_h_480_40k_pascal_context_59.pth", "pascal-context-59",
         SegmentationProtocol(test_size=(4096, 520), reduce_zero_label=True), (69.7,), "Pascal Context 59 val",
         small_head=True),
)

def _coco(arch: str, schedule: str, box_ap: float, mask_ap: float) -> Weights:
    size = arch.rsplit("_", 1)[-1]
    protocol = "1333x800 keep-ratio, pad x32"
    file = f"cascade_internimage_{size}" if arch.startswith("cascade_") else f"mask_rcnn_internimage_{size}"
    return Weights(arch, f"coco_{schedule}", "detect", DetectionProtocol(), num_classes=80, labels="coco",
                   file=f"{file}_fpn_{schedule}_coco.pth", hf_hub_id=_INTERNIMAGE_HUB,
                   metrics=(Metric("bbox_AP", box_ap, "COCO val2017", protocol, _COCO_README),
                            Metric("segm_AP", mask_ap, "COCO val2017", protocol, _COCO_README)))


_add(
    _coco("mask_rcnn_internimage_t", "1x", 47.2, 42.5), _coco("mask_rcnn_internimage_t", "3x", 49.1, 43.7),
    _coco("mask_rcnn_internimage_s", "1x", 47.8, 43.3), _coco("mask_rcnn_internimage_s", "3x", 49.7, 44.5),
    _coco("mask_rcnn_internimage_b", "1x", 48.8, 44.0), _coco("mask_rcnn_internimage_b", "3x", 50.3, 44.8),
    _coco("cascade_mask_rcnn_internimage_l", "1x", 54.9, 47.7),
    _coco("cascade_mask_rcnn_internimage_l", "3x", 56.1, 48.5),
    _coco("cascade_mask_rcnn_internimage_xl", "1x", 55.3, 48.1),
    _coco("cascade_mask_rcnn_internimage_xl", "3x", 56.2, 48.8),
)


def _dino(arch: str, tag: str, file: str, box_ap: float) -> Weights:
    return Weights(arch, tag, "detect", DetectionProtocol(), num_classes=80, labels="coco", file=file,
                   hf_hub_id=_INTERNIMAGE_HUB, metrics=(Metric("bbox_AP", box_ap, "COCO val2017",
                                                               "1333x800 keep-ratio, pad x32", _COCO_README),))


_add(
    _dino("dino_4scale_internimage_t", "coco_1x", "dino_4scale_internimage_t_1x_coco.pth", 53.9),
    _dino("dino_4scale_internimage_l", "coco_1x", "dino_4scale_internimage_l_1x_coco_layer_wise_lr.pth", 57.5),
    _dino("dino_4scale_internimage_l", "coco_1x_backbone_lr",
          "dino_4scale_internimage_l_1x_coco_0.1x_backbone_lr.pth", 57.6),
    # No official configuration or checkpoint for S / B: InternImage-S/B under DINO-T's head.
    *(Weights(name, None, "detect", DetectionProtocol(), num_classes=80, labels="coco")
      for name in ("dino_4scale_internimage_s", "dino_4scale_internimage_b")),
)


# VideoMAE's test (kinetics.py / ssv2.py): shorter side 224 by cv2 (no antialiasing), 3 crops; Kinetics: 16
# frames 4 apart, 5 clips; Something-Something v2: 16 segments, 2 views.
_KINETICS_TEST = VideoProtocol(test_clips=5, test_crops=3, short_side=224, antialias=False)
_SSV2_TEST = VideoProtocol(sampling="segment", stride=1, test_clips=2, test_crops=3, short_side=224, antialias=False)
_VIDEOMAE_ZOO = "MCG-NJU/VideoMAE MODEL_ZOO.md"
_VIDEOMAEV2_ZOO = "OpenGVLab/VideoMAEv2 docs/MODEL_ZOO.md"
_INTERNVIDEO_MAE = "OpenGVLab/InternVideo InternVideo1/Pretrain/VideoMAE/README.md"
_INTERNVIDEO_OSS = "https://pjlab-gvm-data.oss-cn-shanghai.aliyuncs.com/internvideo/pretrain/videomae/"
_DATASETS = {"kinetics-400": ("Kinetics-400 val", _KINETICS_TEST, 400), "ssv2": ("Something-Something v2 val",
             _SSV2_TEST, 174), "kinetics-710": ("Kinetics-710 val", _KINETICS_TEST, 710)}


def _video(size: str, tag: str, labels: str, top1: Optional[float], source: str, hf_hub_id: Optional[str] = None,
           file: Optional[str] = None, url: Optional[str] = None) -> Weights:
    dataset, protocol, classes = _DATASETS[labels]
    views = f"{protocol.num_frames} frames, {protocol.test_clips} clips x {protocol.test_crops} crops"
    metrics = (Metric("top1", top1, dataset, views, source),) if top1 is not None else ()
    return Weights(f"videomae_vit_{size}", tag, "video-cls", protocol, num_classes=classes, labels=labels,
                   file=file or (hf_hub_id or "").split("/")[-1], hf_hub_id=hf_hub_id, url=url, metrics=metrics,
                   classifier="head", first_conv="patch_embed.proj")


def _internvideo(size: str, dataset: str, labels: str, top1: Optional[float]) -> Weights:
    """InternVideo's VideoMAE fine-tuned from UnlabeledHybrid pre-training (published on Aliyun OSS)."""
    file = f"vit_{size}_hybrid_pt_800e_{dataset}_ft.pth"
    return _video(size, f"internvideo_{dataset}", labels, top1, _INTERNVIDEO_MAE, file=file,
                  url=_INTERNVIDEO_OSS + file)


_add(
    _video("s", "k400", "kinetics-400", 79.0, _VIDEOMAE_ZOO, "MCG-NJU/videomae-small-finetuned-kinetics"),
    _video("s", "ssv2", "ssv2", 66.8, _VIDEOMAE_ZOO, "MCG-NJU/videomae-small-finetuned-ssv2"),
    _video("s", "k710_distilled", "kinetics-710", 77.6, _VIDEOMAEV2_ZOO, "OpenGVLab/VideoMAE2",
           file="distill/vit_s_k710_dl_from_giant.pth"),
    _video("b", "k400", "kinetics-400", 81.5, _VIDEOMAE_ZOO, "MCG-NJU/videomae-base-finetuned-kinetics"),
    _video("b", "ssv2", "ssv2", 70.8, _VIDEOMAE_ZOO, "MCG-NJU/videomae-base-finetuned-ssv2"),
    _video("b", "k710_distilled", "kinetics-710", 81.5, _VIDEOMAEV2_ZOO, "OpenGVLab/VideoMAE2",
           file="distill/vit_b_k710_dl_from_giant.pth"),
    _internvideo("b", "k400", "kinetics-400", 81.52),
    _internvideo("b", "k710", "kinetics-710", 79.33),
    _internvideo("b", "ssv2", "ssv2", 71.22),
    _video("l", "k400", "kinetics-400", 85.2, _VIDEOMAE_ZOO, "MCG-NJU/videomae-large-finetuned-kinetics"),
    _internvideo("l", "k400", "kinetics-400", None),
    _internvideo("l", "ssv2", "ssv2", None),
    _video("h", "k400", "kinetics-400", 86.6, _VIDEOMAE_ZOO, "MCG-NJU/videomae-huge-finetuned-kinetics"),
    Weights("videomae_vit_g", None, "video-cls", _KINETICS_TEST, classifier="head", first_conv="patch_embed.proj"),
)


def _mae(size: str, tag: str, hub: str, file: str, **decoder: int) -> Weights:
    """A released VideoMAE pre-training model (encoder + pixel decoder; ``decoder``: its decoder's shape where it
    is not the preset's)."""
    return Weights(f"videomae_pretrain_vit_{size}", tag, "video-pretrain", VideoProtocol(), file=file,
                   hf_hub_id=hub, arch_overrides=decoder, first_conv="encoder.patch_embed.proj")


_add(
    _mae("s", None, None, None),
    _mae("b", "internvideo_hybrid", "OpenGVLab/InternVideoMAE_models", "mae-b/pytorch_model.bin"),
    _mae("b", "k400", "MCG-NJU/videomae-base", "videomae-base"),
    _mae("l", "internvideo_hybrid", "OpenGVLab/InternVideoMAE_models", "mae-l/pytorch_model.bin"),
    _mae("l", "k400", "MCG-NJU/videomae-large", "videomae-large"),
    _mae("h", "internvideo_hybrid", "OpenGVLab/InternVideoMAE_models", "mae-h/pytorch_model.bin"),
    _mae("g", None, None, None),
)

# InternVideo-MM: the official demo's frames (internvideo.py load_video). The published zero-shot numbers average
# the weights 50/50 with OpenAI's CLIP ViT-L/14 (CoTrain clip_wiseft_coef=0.5): this file alone does not give them.
_MM_TEST = VideoTextProtocol(short_side=256)
_MM_README = "OpenGVLab/InternVideo InternVideo1/Downstream/multi-modalities-downstream/README.md"


def _mm(size: str, file: str, top1: float, hub: Optional[str] = None, url: Optional[str] = None) -> Weights:
    metric = Metric("zero_shot_top1", top1, "Kinetics-400 test", "8 frames; weights averaged 0.5 with OpenAI CLIP "
                    "(not this file alone)", _MM_README)
    return Weights(f"internvideo_mm_{size}", "official", "video-text", _MM_TEST, file=file, hf_hub_id=hub, url=url,
                   metrics=(metric,))


_add(
    _mm("l14", "InternVideo-MM-L-14.ckpt", 64.25, hub="OpenGVLab/InternVideo1.0"),
    _mm("b16", "InternVideo-MM-B-16.ckpt", 56.65,
        url="https://pjlab-gvm-data.oss-cn-shanghai.aliyuncs.com/internvideo/pretrain/InternVideo-MM-B-16.ckpt"),
    Weights("internvideo_mm_tiny", None, "video-text", VideoTextProtocol()),
     *(Weights(name, None, "translation", TranslationProtocol()) for name in ("intern2_mt_tiny", "intern2_mt_small")))


def _nllb(arch: str, tag: str, hub: str) -> Weights:
    """An NLLB-200 HF folder: looked up by its folder name in $INTERN2_HOME."""
    return Weights(arch, tag, "translation", TranslationProtocol(), file=hub.split("/")[-1], hf_hub_id=hub)


_add(_nllb("intern2_mt_600m", "nllb200_distilled", "facebook/nllb-200-distilled-600M"),
     _nllb("intern2_mt_1p3b", "nllb200", "facebook/nllb-200-1.3B"),
     _nllb("intern2_mt_1p3b", "nllb200_distilled", "facebook/nllb-200-distilled-1.3B"),
     _nllb("intern2_mt_3p3b", "nllb200", "facebook/nllb-200-3.3B"))


# ActionFormer on InternVideo features (InternVideo1/Downstream/Temporal-Action-Localization): the features and the
# configs are published, trained localizers are not, so these records carry the protocol and the published number.
_TAL_README = "OpenGVLab/InternVideo InternVideo1/Downstream/Temporal-Action-Localization/README.md"
_add(Weights("actionformer_thumos14", None, "tal", TemporalLocalizationProtocol(4, 16, None, "thumos14"),
             metrics=(Metric("average_mAP", 71.58, "THUMOS14 test", "tIoU 0.3:0.7, InternVideo features",
                             _TAL_README),)),
     Weights("actionformer_activitynet", None, "tal", TemporalLocalizationProtocol(16, 16, None, "activitynet"),
             metrics=(Metric("average_mAP", 39.00, "ActivityNet-1.3 val", "tIoU 0.5:0.95, InternVideo features",
                             _TAL_README),)))
