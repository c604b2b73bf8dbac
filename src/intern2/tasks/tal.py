"""Temporal action localization: `intern2 train tal` (ActionFormer on snippet-feature folders + ActivityNet-layout
annotations, or the built-in untrimmed videos), `intern2 eval` (the official mAP through the TAL pipeline) and
`intern2 eval-tal` (the official metric of a prediction file).

The metric is ActivityNet's detection mAP with the semantics of the code behind InternVideo's published TAL numbers
(ActionFormer's port, ``libs/utils/metrics.py`` in OpenGVLab/InternVideo): for each class and temporal-IoU threshold,
predictions sorted by score claim the unclaimed ground-truth instance they overlap most, at or above the threshold;
AP is the area under the precision/recall curve made monotone from the right (VOC2011 style); mAP is the mean over
the classes that have ground truth in the subset; average mAP is the mean over the thresholds.

Where the official code is ambiguous or wrong, the choice made here (``../shared/fixtures/tal/README.md`` has the
measurements):

* Ground truth: the subset is matched case-insensitively; an instance is dropped when one of the same class with
  both boundaries within 1e-3 s was already kept in that video (InternVideo's de-duplication).
* Ties (equal scores, equal IoUs) rank the later entry first: ``np.argsort(x, kind="stable")[::-1]``. The official
  numbers were computed where numpy's default sort behaved so (numpy 1.23.5, up to 16 entries); newer numpy breaks
  ties differently, which is why the official code's results depend on the numpy version.
* Predictions of a class without ground truth in the subset are dropped with a warning. (The official code re-indexes
  classes and silently scores them as another class's; ActivityNet's raises a KeyError.) Predictions for videos
  outside the subset stay: they are false positives, as in the official code.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import check_positive, check_range
from ..data.temporal import TemporalDataset, TemporalSource, class_names, collate_temporal, open_temporal_source
from ..engine import TrainConfig
from ..factory import create_model, save_pretrained
from ..pipelines.common import add_model_arguments, counted, pipeline_from_args, progress
from ..weights import TemporalLocalizationProtocol, trained_cfg
from .common import head_model_args, train_cli

__all__ = ["TIOU_PRESETS", "Segment", "load_ground_truth", "load_predictions", "interpolated_ap",
           "average_precision", "detection_map", "eval_tal_main", "TALConfig", "TALTask", "evaluate_localizer",
           "train_main", "eval_main"]

log = logging.getLogger(__name__)

TIOU_PRESETS = {"thumos14": np.linspace(0.3, 0.7, 5), "activitynet": np.linspace(0.5, 0.95, 10)}
DUPLICATE_TOLERANCE_S = 1e-3


@dataclass(frozen=True)
class Segment:
    """One ground-truth instance or prediction: video, class id, [start, end] in seconds, score (1 for GT)."""
    video: str
    label: int
    start: float
    end: float
    score: float = 1.0


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object")
    return data


def _segment(entry: Any, where: str) -> Tuple[float, float]:
    segment = entry.get("segment") if isinstance(entry, dict) else None
    if (not isinstance(segment, (list, tuple)) or len(segment) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in segment) or segment[0] > segment[1]):
        raise ValueError(f"{where}: 'segment' must be [start, end] in seconds with start <= end, got {segment!r}")
    return float(segment[0]), float(segment[1])


def _entries(value: Any, where: str, what: str) -> List[Dict[str, Any]]:
    """``value`` if it is a list of JSON objects, else a ValueError naming ``where``."""
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise ValueError(f"{where}: expected a list of {what} objects, got {json.dumps(value)[:60]}")
    return value


def load_ground_truth(path: Path, subset: str = "validation", skip_unusable: bool = False,
                      classes: Optional[Sequence[str]] = None) -> Tuple[List[Segment], Dict[int, str]]:
    """The de-duplicated instances of ``subset`` in an ActivityNet-layout file and the class names by id. A label
    is its name's index in ``classes`` (a training run's), by default numbered as training numbers them (the
    ``label_id`` when every annotation has one, else the sorted names); a name-less annotation gives its
    ``label_id``, named by the taxonomy node of that id if there is one (the taxonomy's ids number its nodes,
    parents included, not the classes: they never renumber a named label). An unusable video record or
    annotation is an error naming it, or with ``skip_unusable`` (the evaluation of a training run, whose data
    source skips and counts them too) left out."""
    data = _read_json(path, "ground truth")
    database = data.get("database")
    if not isinstance(database, dict):
        raise ValueError(f"ground truth {path}: expected a 'database' object of videos (ActivityNet layout)")
    ids = {name: i for i, name in enumerate(classes if classes is not None else class_names(path, database))}
    taxonomy: Dict[int, str] = {}
    for node in _entries(data.get("taxonomy", []), f"ground truth {path}: taxonomy", "class"):
        if "nodeId" in node:
            try:
                taxonomy[int(node["nodeId"])] = str(node.get("nodeName", node["nodeId"]))
            except (TypeError, ValueError):
                raise ValueError(f"ground truth {path}: taxonomy: nodeId {node['nodeId']!r} is not an integer") \
                    from None
    instances: List[Segment] = []
    for video, record in database.items():
        try:
            instances += _video_instances(path, video, record, subset, ids, skip_unusable)
        except ValueError:  # the record itself
            if not skip_unusable:
                raise
    if not instances:
        raise ValueError(f"ground truth {path}: no annotated video in subset {subset!r}")
    names = {i: name for name, i in ids.items()}
    for label in sorted({instance.label for instance in instances} - set(names)):  # name-less label_ids
        names[label] = taxonomy.get(label, str(label))
    return instances, names


def _video_instances(path: Path, video: str, record: Any, subset: str, ids: Dict[str, int],
                     skip_unusable: bool) -> List[Segment]:
    """One video's de-duplicated instances if it is in ``subset`` (unusable annotations left out with
    ``skip_unusable``)."""
    if not isinstance(record, dict):
        raise ValueError(f"ground truth {path}: {video}: expected a video object ('subset', 'annotations'), "
                         f"got {json.dumps(record)[:60]}")
    if str(record.get("subset", "")).lower() != subset.lower():
        return []
    kept: List[Segment] = []
    annotations = _entries(record.get("annotations", []), f"ground truth {path}: {video} annotations", "annotation")
    for i, entry in enumerate(annotations):
        where = f"ground truth {path}: {video} annotation {i}"
        try:
            label = _label_id(entry, ids, where)
            start, end = _segment(entry, where)
        except ValueError:
            if skip_unusable:
                continue
            raise
        instance = Segment(video, label, start, end)
        if not any(k.label == instance.label and abs(k.start - start) <= DUPLICATE_TOLERANCE_S
                   and abs(k.end - end) <= DUPLICATE_TOLERANCE_S for k in kept):
            kept.append(instance)
    return kept


def _label_id(entry: Dict[str, Any], ids: Dict[str, int], where: str) -> int:
    """An entry's class id: its ``label`` name's in ``ids``, else its integer ``label_id``."""
    label = entry.get("label")
    if isinstance(label, str) and label in ids:
        return ids[label]
    if isinstance(entry.get("label_id"), int) and not isinstance(entry["label_id"], bool):
        return entry["label_id"]
    raise ValueError(f"{where}: expected a known 'label' name or an integer 'label_id', got label={label!r}, "
                     f"label_id={entry.get('label_id')!r}")


def load_predictions(path: Path, ids: Optional[Dict[str, int]] = None) -> List[Segment]:
    """Predictions in the ActivityNet challenge layout (``results``: video -> [{label, score, segment}]) or
    ActionFormer's (``database``: video -> [{label_id, scores, segment}]), in file order; a ``label`` name is
    numbered by ``ids`` (the ground truth's), else ``label_id`` gives the class."""
    data = _read_json(path, "predictions")
    layout = "results" if "results" in data else "database" if "database" in data else None
    if layout is None or not isinstance(data[layout], dict):
        raise ValueError(f"predictions {path}: expected a 'results' (ActivityNet) or 'database' (ActionFormer) "
                         f"object of videos")
    score_key = "score" if layout == "results" else "scores"
    predictions = []
    for video, entries in data[layout].items():
        for i, entry in enumerate(_entries(entries, f"predictions {path}: {video}", "prediction")):
            where = f"predictions {path}: {video} entry {i}"
            start, end = _segment(entry, where)
            label, score = _label_id(entry, ids or {}, where), entry.get(score_key)
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise ValueError(f"{where}: expected a finite number '{score_key}', got {score!r}")
            predictions.append(Segment(video, label, start, end, float(score)))
    return predictions


def _later_first(values: np.ndarray) -> np.ndarray:
    """Indices of ``values`` from largest to smallest, equal values in reverse order of appearance."""
    return np.argsort(values, kind="stable")[::-1]


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision/recall curve with precision made monotone from the right (VOC2011)."""
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mprec[steps]))


def _iou(start: float, end: float, gt: np.ndarray) -> np.ndarray:
    """Temporal IoU of one segment with the rows of ``gt`` (N, 2)."""
    inter = (np.minimum(end, gt[:, 1]) - np.maximum(start, gt[:, 0])).clip(0)
    union = (gt[:, 1] - gt[:, 0]) + (end - start) - inter
    with np.errstate(divide="ignore", invalid="ignore"):  # zero-length segments: nan, which matches nothing
        return inter / union


def average_precision(ground_truth: Sequence[Segment], predictions: Sequence[Segment],
                      thresholds: Sequence[float]) -> np.ndarray:
    """AP of one class at each temporal-IoU threshold."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if not ground_truth or not predictions:
        return np.zeros(len(thresholds))
    by_video: Dict[str, List[int]] = {}
    for i, instance in enumerate(ground_truth):
        by_video.setdefault(instance.video, []).append(i)
    bounds = np.array([[g.start, g.end] for g in ground_truth])
    claimed = np.full((len(thresholds), len(ground_truth)), False)
    tp = np.zeros((len(thresholds), len(predictions)))
    order = _later_first(np.array([p.score for p in predictions]))
    for rank, index in enumerate(order):
        pred = predictions[index]
        rows = by_video.get(pred.video)
        if rows is None:  # a video without ground truth of this class: a false positive at every threshold
            continue
        ious = _iou(pred.start, pred.end, bounds[rows])
        candidates = _later_first(ious)
        for t, threshold in enumerate(thresholds):
            for j in candidates:
                if ious[j] < threshold:  # the best unclaimed overlap is too small (nan is not: as officially)
                    break
                if not claimed[t, rows[j]]:
                    claimed[t, rows[j]] = True
                    tp[t, rank] = 1
                    break
    tp_sum = np.cumsum(tp, axis=1)
    fp_sum = np.cumsum(1 - tp, axis=1)
    recall = tp_sum / len(ground_truth)
    precision = tp_sum / (tp_sum + fp_sum)
    return np.array([interpolated_ap(precision[t], recall[t]) for t in range(len(thresholds))])


def detection_map(ground_truth: Sequence[Segment], predictions: Sequence[Segment], thresholds: Sequence[float],
                  names: Optional[Dict[int, str]] = None) -> Dict[str, Any]:
    """``{"tiou", "mAP" (per threshold), "average_mAP", "ap_per_class" (name -> per threshold), "num_gt",
    "dropped_predictions"}`` over the classes with ground truth."""
    names = names or {}
    classes = sorted({g.label for g in ground_truth})
    known = set(classes)
    dropped = [p for p in predictions if p.label not in known]
    if dropped:
        labels = sorted({p.label for p in dropped})
        log.warning("%d predictions of classes without ground truth in the subset dropped (class ids %s)",
                    len(dropped), labels)
    ap = np.stack([average_precision([g for g in ground_truth if g.label == c],
                                     [p for p in predictions if p.label == c], thresholds) for c in classes])
    mean = ap.mean(axis=0)
    return {"tiou": [float(t) for t in thresholds], "mAP": mean.tolist(), "average_mAP": float(mean.mean()),
            "ap_per_class": {names.get(c, str(c)): ap[i].tolist() for i, c in enumerate(classes)},
            "num_gt": len(ground_truth), "dropped_predictions": len(dropped)}


def _thresholds(text: str) -> np.ndarray:
    if text in TIOU_PRESETS:
        return TIOU_PRESETS[text]
    try:
        start, stop, count = text.split(":")
        values = np.linspace(float(start), float(stop), int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thumos14, activitynet or START:STOP:NUM, got {text!r}") from None
    if not (len(values) and np.all((values > 0) & (values <= 1))):
        raise argparse.ArgumentTypeError(f"expected thresholds in (0, 1], got {text!r}")
    return values


def eval_tal_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 eval-tal GROUND_TRUTH.json PREDICTIONS.json`: the official detection mAP of a prediction file."""
    parser = argparse.ArgumentParser(prog="intern2 eval-tal", description="Temporal action localization mAP at "
                                     "temporal-IoU thresholds, as InternVideo's published numbers were computed.")
    parser.add_argument("ground_truth", type=Path, help="ActivityNet-layout JSON (database: video -> annotations)")
    parser.add_argument("predictions", type=Path, help="ActivityNet 'results' or ActionFormer 'database' JSON")
    parser.add_argument("--tiou", type=_thresholds, default=TIOU_PRESETS["thumos14"],
                        help="thumos14 (0.3:0.7:5, default), activitynet (0.5:0.95:10) or START:STOP:NUM")
    parser.add_argument("--subset", default="validation", help="the ground truth's subset to score (any case)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        ground_truth, names = load_ground_truth(args.ground_truth, args.subset)
        predictions = load_predictions(args.predictions, {name: i for i, name in names.items()})
    except ValueError as exc:
        parser.error(str(exc))
    metrics = detection_map(ground_truth, predictions, args.tiou, names)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"average mAP {100 * metrics['average_mAP']:.2f} over tIoU "
          + " ".join(f"{t:.2f}" for t in metrics["tiou"]) + f" ({metrics['num_gt']} ground-truth instances)")
    print("  mAP: " + "  ".join(f"{100 * m:.2f}" for m in metrics["mAP"]))
    for name, values in metrics["ap_per_class"].items():
        print(f"  {name}: " + "  ".join(f"{100 * v:.2f}" for v in values))
    return 0


# --------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TALConfig:
    model: str = "actionformer_thumos14"
    model_args: Optional[Dict[str, Any]] = None  # e.g. {embd_dim: 64, arch: [2, 2, 2], n_mha_win_size: 9}
    checkpoint: Optional[str] = None  # localizer weights to start from (an official ActionFormer checkpoint too)
    data: str = "builtin:untrimmed"  # generated videos, features by `encoder`; unused when the two below are set
    annotations: Optional[str] = None  # ActivityNet-layout JSON ...
    features: Optional[str] = None  # ... and the folder of its <prefix><video_id>.npy (T, C) snippet features
    file_prefix: str = ""  # ActivityNet feature files are often 'v_<id>.npy'
    train_subset: str = "training"  # THUMOS14 trains on 'validation' and tests on 'test'
    val_subset: str = "validation"
    feat_stride: int = 4  # frames between snippets (InternVideo THUMOS14: 4; ActivityNet: 16)
    feat_num_frames: int = 16  # frames per snippet
    default_fps: Optional[float] = None  # else the feature sidecar's, else the annotation's fps
    tiou: str = "thumos14"  # thresholds of the mAP: thumos14 (0.3:0.7) or activitynet (0.5:0.95)
    trunc_thresh: float = 0.5  # a training crop keeps actions with at least this fraction inside
    crop_ratio: Optional[Tuple[float, float]] = (0.9, 1.0)  # random crop length of short videos (None: off)
    encoder: Optional[str] = None  # builtin:untrimmed: the video model folder that extracts the features
    builtin_videos: Tuple[int, int] = (120, 40)  # builtin:untrimmed: (training, validation) videos ...
    builtin_classes: int = 10  # ... of the first this many action classes (4: the moves right/left/down/up)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_positive(self, "feat_stride", "feat_num_frames", "default_fps", "builtin_videos", "builtin_classes")
        check_range(self, "trunc_thresh", "[0, 1]")
        check_range(self, "crop_ratio", "(0, 1]", pair=True)
        if self.tiou not in TIOU_PRESETS:
            raise ValueError(f"tiou: expected one of {sorted(TIOU_PRESETS)}, got {self.tiou!r}")
        if bool(self.annotations) != bool(self.features):
            raise ValueError("annotations and features: set both (the JSON and the feature folder), or neither "
                             "(data=builtin:untrimmed)")
        if not self.annotations and self.data != "builtin:untrimmed":
            raise ValueError(f"data: expected builtin:untrimmed (or set annotations= and features=), got "
                             f"{self.data!r}")


def _prediction_segments(video: str, result: Dict[str, Any], gt_ids: Dict[str, int]) -> List[Segment]:
    """Pipeline segments as metric entries, class ids by name in the ground truth's ids (a class the ground truth
    does not know gets a fresh negative id: the metric drops it with a warning)."""
    return [Segment(video, gt_ids.get(s["label"], -1 - s["index"]), s["segment"][0], s["segment"][1], s["score"])
            for s in result["segments"]]


def evaluate_localizer(model: nn.Module, source: TemporalSource, protocol: TemporalLocalizationProtocol,
                       thresholds: Sequence[float], labels: Sequence[str],
                       ground_truth: Optional[Tuple[List[Segment], Dict[int, str]]] = None
                       ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(metrics, predictions in ActionFormer's ``database`` layout) of ``model`` on every video of ``source``,
    through the TAL pipeline (what `predict` returns) and the official metric; ``ground_truth`` is
    :func:`source_ground_truth` read beforehand, if it was."""
    from ..pipelines.tal import TemporalLocalizationPipeline
    pipeline = TemporalLocalizationPipeline(model, **{k: v for k, v in protocol.to_cfg().items()})
    pipeline.labels = list(labels)
    ground_truth, names = ground_truth or source_ground_truth(source)
    gt_ids = {name: i for i, name in names.items()}
    predictions: List[Segment] = []
    database: Dict[str, List[Dict[str, Any]]] = {}
    for video in progress(source.videos, "eval", len(source.videos)):
        result = pipeline(video.feature_file, fps=video.fps, min_score=0.0, topk=None,  # the metric reads all
                          duration=video.duration if math.isfinite(video.duration) else None)
        found = _prediction_segments(video.video_id, result, gt_ids)
        predictions += found
        database[video.video_id] = [{"segment": [p.start, p.end], "label_id": p.label, "label": s["label"],
                                     "scores": p.score} for p, s in zip(found, result["segments"])]
    metrics = detection_map(ground_truth, predictions, thresholds, names)
    metrics.update(videos=len(source.videos), skipped=len(source.problems))
    return metrics, {"version": "intern2", "database": database}


def source_ground_truth(source: TemporalSource) -> Tuple[List[Segment], Dict[int, str]]:
    """The usable ground-truth instances of a source's subset and the class names (the metric's input)."""
    return load_ground_truth(source.annotation_file, source.subset, skip_unusable=True, classes=source.classes)


class TALTask:
    """ActionFormer training on snippet features; mAP over the validation subset at the protocol's thresholds."""

    # Fields a resumed run may change: the evaluation's subset and thresholds; initial weights (the resume
    # replaces them).
    resume_may_change = frozenset({"val_subset", "tiou", "checkpoint"})

    def __init__(self, cfg: TALConfig):
        self.cfg = cfg
        annotations, features = (cfg.annotations, cfg.features) if cfg.annotations else builtin_tal_data(cfg)
        options = dict(default_fps=cfg.default_fps, file_prefix=cfg.file_prefix)
        self.train_source = open_temporal_source(annotations, features, cfg.train_subset, **options)
        self.classes = self.train_source.classes
        self.val_source = open_temporal_source(annotations, features, cfg.val_subset, self.classes,
                                               self.train_source.feature_dim, **options)
        self.protocol = TemporalLocalizationProtocol(cfg.feat_stride, cfg.feat_num_frames, cfg.default_fps, cfg.tiou)
        self.val_ground_truth = source_ground_truth(self.val_source)  # read now: a problem shows before training
        self.skipped = len(self.train_source.problems)

    def build_model(self) -> nn.Module:
        model = create_model(self.cfg.model, input_dim=self.train_source.feature_dim,
                             **head_model_args(self.cfg.model_args, len(self.classes),
                                              self.cfg.annotations or self.cfg.data))
        if self.cfg.checkpoint:
            from ..checkpoint import load_checkpoint
            load_checkpoint(model, self.cfg.checkpoint)
        return model

    def train_dataset(self) -> Dataset:
        cfg = self.cfg
        return TemporalDataset(self.train_source, cfg.feat_stride, cfg.feat_num_frames, True,
                               self._max_seq_len(), cfg.trunc_thresh, cfg.crop_ratio, cfg.train.seed)

    def eval_dataset(self) -> Dataset:
        return TemporalDataset(self.val_source, self.cfg.feat_stride, self.cfg.feat_num_frames)

    def _max_seq_len(self) -> int:
        """The localizer's training length (``model_args``, else its preset's): longer sequences are cropped."""
        from ..models.actionformer import ACTIONFORMER_VARIANTS
        preset = ACTIONFORMER_VARIANTS.get(self.cfg.model.partition(".")[0], {})
        return int((self.cfg.model_args or {}).get("max_seq_len", preset.get("max_seq_len", 2304)))

    def collate(self, samples):
        return collate_temporal(samples)

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        core = getattr(model, "module", model)  # DDP wraps the localizer; padding and targets are its own
        param = next(core.parameters())
        feats, mask = core.pad_features([item["feats"].to(param) for item in batch], core.max_seq_len)
        cls_logits, offsets, masks = model(feats, mask)
        losses = core.loss(cls_logits, offsets, masks, [item["segments"] for item in batch],
                           [item["labels"] for item in batch])
        return losses["final_loss"], {"cls_loss": losses["cls_loss"].item(), "reg_loss": losses["reg_loss"].item(),
                                      "skipped_entries": self.skipped}

    def evaluate(self, model: nn.Module, dataset: TemporalDataset, batch_size: int,
                 device: torch.device) -> Dict[str, Any]:
        was_training = model.training
        metrics, _ = evaluate_localizer(model.eval(), dataset.source, self.protocol, TIOU_PRESETS[self.cfg.tiou],
                                        self.classes, self.val_ground_truth)
        model.train(was_training)
        return metrics

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.pretrained_cfg = trained_cfg(getattr(model, "pretrained_cfg", {}), {
            "num_classes": len(self.classes), "label_names": list(self.classes), **self.protocol.to_cfg(),
            "feature_encoder": self.cfg.encoder})
        save_pretrained(model, directory)


# Without an encoder, built-in features come from this untrained tiny video ViT (seeded): a baseline that sees
# motion but knows no action; the recipe extracts with the encoder fine-tuned by the actions-finetune recipe.
BUILTIN_ENCODER = ("videomae_vit_s", dict(embed_dim=96, depth=4, num_heads=4, patch_size=8, all_frames=8,
                                          img_size=32, num_classes=0))


def _builtin_encoder(spec: Optional[str]) -> nn.Module:
    if spec:
        from ..pipelines.common import load_model_spec
        return load_model_spec(spec, "encoder")
    name, kwargs = BUILTIN_ENCODER
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_model(name, **kwargs).eval()


def builtin_tal_data(cfg: TALConfig) -> Tuple[str, str]:
    """(annotations, feature folder) of the built-in untrimmed videos, features extracted by ``cfg.encoder`` (a
    model folder, NAME or NAME:WEIGHTS; default :data:`BUILTIN_ENCODER`) in snippets of ``feat_num_frames``
    frames every ``feat_stride``; cached beside the videos under a digest of the encoder's weights, so a retrained
    encoder extracts afresh. A video that fails to extract is a ValueError naming it."""
    import hashlib

    from ..data.untrimmed import builtin_untrimmed_root
    from ..pipelines.snippets import SnippetFeatureExtractor, SnippetProtocol
    root = builtin_untrimmed_root(*cfg.builtin_videos, num_classes=cfg.builtin_classes)
    encoder = _builtin_encoder(cfg.encoder)
    digest = hashlib.sha1()
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    key = digest.hexdigest()[:12]
    snippets = SnippetProtocol(cfg.feat_num_frames, cfg.feat_stride)
    extractor = SnippetFeatureExtractor(encoder, snippets, source=f"{cfg.encoder or 'builtin encoder'} ({key})")
    out = root / "features" / f"{key}-f{cfg.feat_num_frames}s{cfg.feat_stride}"
    files = sorted(str(p) for p in (root / "videos").glob("*.mp4"))
    log.info("built-in TAL features of %d videos -> %s", len(files), out)
    summary = extractor.extract_to_folder(files, out)
    if summary["failed"]:
        raise ValueError(f"built-in untrimmed videos: {summary['failed'][0]}")
    return str(root / "annotations.json"), str(out)


def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "tal", "Train a temporal action localizer (ActionFormer) on snippet features.",
                     TALConfig, TALTask, "builtin:untrimmed (or set annotations= and features=)",
                     "actionformer_thumos14", hide=("ap_per_class",))


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a temporal action localizer: the "
                                     "official mAP (InternVideo's metric) over an annotated subset.")
    parser.add_argument("--annotations", required=True, help="ActivityNet-layout JSON")
    parser.add_argument("--features", required=True, help="folder of <prefix><video_id>.npy (T, C) snippet features")
    parser.add_argument("--subset", default="validation", help="the annotations' subset to score (any case)")
    parser.add_argument("--file-prefix", default="", help="feature file name prefix (ActivityNet: often 'v_')")
    parser.add_argument("--tiou", choices=sorted(TIOU_PRESETS), help="thresholds (default: the model's protocol)")
    parser.add_argument("--fps", type=float, help="frame rate of every video (default: sidecar / annotation fps)")
    parser.add_argument("--out", type=Path, help="also write the predictions (ActionFormer layout) to this JSON")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from ..pipelines.tal import TemporalLocalizationPipeline
    pipeline = pipeline_from_args(parser, args, TemporalLocalizationPipeline, tiou=args.tiou, default_fps=args.fps)
    try:
        source = open_temporal_source(args.annotations, args.features, args.subset, pipeline.labels,
                                      pipeline.model.input_dim, pipeline.protocol.default_fps, args.file_prefix)
        metrics, predictions = evaluate_localizer(pipeline.model, source, pipeline.protocol,
                                                  TIOU_PRESETS[pipeline.protocol.tiou], pipeline.labels)
    except ValueError as exc:
        parser.error(str(exc))
    if args.out:
        from ..checkpoint import atomic_write
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(predictions)))
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{source.name}: average mAP {100 * metrics['average_mAP']:.2f} over tIoU "
          + " ".join(f"{t:.2f}" for t in metrics["tiou"])
          + f" ({counted(metrics['videos'], 'video')}, {metrics['skipped']} skipped)")
    print("  mAP: " + "  ".join(f"{100 * m:.2f}" for m in metrics["mAP"]))
    return 0
