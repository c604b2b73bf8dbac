"""Inference: a loaded model plus an image, video or text in, a labelled answer out.

One module per family (``image_cls``, ``detect``, ``segment``, ``video_cls``, ``video_text``, ``translation``,
``tal``; ``snippets`` extracts the per-snippet video features that ``tal`` localizes in).
A pipeline loads any checkpoint intern2 reads, prepares its input exactly as the checkpoint's evaluation protocol
says (its weights metadata, :mod:`intern2.weights`), runs the model and returns class names with their indices.
Every door goes through here: the Python API, ``intern2 predict`` / ``eval`` (through the tasks) and ``serve``.
Boundary: pipelines import models, data, text, weights and checkpoint code, never ``tasks``, ``engine`` or
``serve``.

    >>> from intern2.pipelines import open_pipeline
    >>> segmentor = open_pipeline(model="upernet_internimage_t.ade20k", checkpoint="upernet_internimage_t.pth")
    >>> segmentor(image)["classes"][0]
    {'label': 'wall', 'index': 0, 'fraction': 0.31, 'colour': '#...'}
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from .common import Pipeline, open_pipeline

__all__ = ["Pipeline", "open_pipeline", "pipeline_class", "PIPELINES", "predict_main"]

# task -> "module:class" (imported on use, so a pipeline loads only its own family's dependencies)
PIPELINES = {"image-cls": "image_cls:ImageClassificationPipeline", "detect": "detect:DetectionPipeline",
             "segment": "segment:SegmentationPipeline", "video-cls": "video_cls:VideoClassificationPipeline",
             "video-text": "video_text:VideoTextPipeline", "translation": "translation:Translator",
             "tal": "tal:TemporalLocalizationPipeline"}


def pipeline_class(task: Optional[str]) -> type:
    """The pipeline class of ``task``; a ValueError lists the tasks that have one."""
    if task not in PIPELINES:
        raise ValueError(f"no inference pipeline for task {task!r} (a training-only model?); tasks with one: "
                         f"{', '.join(sorted(PIPELINES))}")
    module, name = PIPELINES[task].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def predict_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 predict`: the task comes from --task or the model (its weights metadata or architecture)."""
    from .common import task_of_arguments
    argv = list(argv or [])
    task = task_of_arguments(argv)
    if {"-h", "--help"} & set(argv) and "--task" not in argv:
        print(f"intern2 predict runs the model's own task (or --task): {', '.join(sorted(PIPELINES))}; each has "
              f"its options: 'intern2 predict --task segment --help'. The {task} options:\n")
    if task not in PIPELINES:
        print(f"intern2 predict: task {task!r} has no 'predict' (it only trains, or is unknown); tasks that "
              f"predict: {', '.join(sorted(PIPELINES))}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{PIPELINES[task].split(':')[0]}")
    return module.predict_main(argv)
