"""Temporal action localization: the official detection metric and the localizer's post-processing (soft-NMS, feature
grid to seconds); the ActionFormer localizer itself joins them here.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["TIOU_PRESETS", "Segment", "load_ground_truth", "load_predictions", "interpolated_ap",
           "average_precision", "detection_map", "eval_tal_main"]

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
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in segment)):
        raise ValueError(f"{where}: 'segment' must be [start, end] in seconds, got {segment!r}")
    return float(segment[0]), float(segment[1])


def load_ground_truth(path: Path, subset: str = "validation") -> Tuple[List[Segment], Dict[int, str]]:
    """The de-duplicated instances of ``subset`` in an ActivityNet-layout file and the class names by id (from
    the taxonomy, else from the annotations' labels)."""
    data = _read_json(path, "ground truth")
    database = data.get("database")
    if not isinstance(database, dict):
        raise ValueError(f"ground truth {path}: expected a 'database' object of videos (ActivityNet layout)")
    names = {int(n["nodeId"]): str(n["nodeName"]) for n in data.get("taxonomy", []) if "nodeId" in n}
    instances: List[Segment] = []
    for video, record in database.items():
        if str(record.get("subset", "")).lower() != subset.lower():
            continue
        kept: List[Segment] = []
        for i, entry in enumerate(record.get("annotations", [])):
            where = f"ground truth {path}: {video} annotation {i}"
            if not isinstance(entry.get("label_id"), int):
                raise ValueError(f"{where}: 'label_id' must be an integer class id, got {entry.get('label_id')!r}")
            start, end = _segment(entry, where)
            names.setdefault(entry["label_id"], str(entry.get("label", entry["label_id"])))
            instance = Segment(video, entry["label_id"], start, end)
            if not any(k.label == instance.label and abs(k.start - start) <= DUPLICATE_TOLERANCE_S
                       and abs(k.end - end) <= DUPLICATE_TOLERANCE_S for k in kept):
                kept.append(instance)
        instances += kept
    if not instances:
        raise ValueError(f"ground truth {path}: no annotated video in subset {subset!r}")
    return instances, names


def load_predictions(path: Path) -> List[Segment]:
    """Predictions in the ActivityNet challenge layout (``results``: video -> [{label_id, score, segment}]) or
    ActionFormer's (``database``: video -> [{label_id, scores, segment}]), in file order."""
    data = _read_json(path, "predictions")
    layout = "results" if "results" in data else "database" if "database" in data else None
    if layout is None or not isinstance(data[layout], dict):
        raise ValueError(f"predictions {path}: expected a 'results' (ActivityNet) or 'database' (ActionFormer) "
                         f"object of videos")
    score_key = "score" if layout == "results" else "scores"
    predictions = []
    for video, entries in data[layout].items():
        for i, entry in enumerate(entries):
            where = f"predictions {path}: {video} entry {i}"
            start, end = _segment(entry, where)
            label, score = entry.get("label_id"), entry.get(score_key)
            if not isinstance(label, int) or not isinstance(score, (int, float)):
                raise ValueError(f"{where}: expected an integer 'label_id' and a number '{score_key}'")
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
        predictions = load_predictions(args.predictions)
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
