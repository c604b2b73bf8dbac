"""Tasks: dataset -> model -> loss -> metrics, plugged into the engine by `intern2 train <task>`.

`intern2 eval` and `intern2 predict` pick the task from ``--task`` or from the model's architecture name.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import List, Optional

TASKS = {"image-cls": "intern2.tasks.image_cls", "segment": "intern2.tasks.segment",
         "detect": "intern2.tasks.detect", "video-cls": "intern2.tasks.video_cls",
         "video-pretrain": "intern2.tasks.video_pretrain", "video-text": "intern2.tasks.video_text",
         "umt": "intern2.tasks.umt", "translation": "intern2.tasks.translation"}
# Architecture name prefix -> task, for eval/predict.
_PREFIXES = (("upernet_", "segment"), ("mask_rcnn_", "detect"), ("videomae_vit_", "video-cls"),
             ("internvideo_mm_", "video-text"), ("intern2_mt_", "translation"), ("m2m_100", "translation"))


def _run(task: str, function: str, argv: List[str]) -> int:
    module = importlib.import_module(TASKS[task])
    if not hasattr(module, function):  # pre-training / distillation tasks have no eval or predict of their own
        command = function[:-len("_main")]
        print(f"intern2 {command}: task {task!r} has no '{command}' (it only trains; evaluate the models it "
              f"initialises)", file=sys.stderr)
        return 2
    return getattr(module, function)(argv)


def train_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 train <task> [options]`."""
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TASKS:
        known = ", ".join(sorted(TASKS))
        print(f"usage: intern2 train <task> [options]   (tasks: {known}; 'intern2 train <task> --help' for options)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return _run(argv[0], "train_main", argv[1:])


def task_of(argv: List[str]) -> str:
    """--task, else the task of --model / the architecture in --checkpoint's config.json; image-cls by default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--task", choices=sorted(TASKS))
    parser.add_argument("--model")
    parser.add_argument("--checkpoint")
    args, _ = parser.parse_known_args(argv)
    if args.task:
        return args.task
    name = args.model or ""
    config = Path(args.checkpoint or "") / "config.json"
    if not name and args.checkpoint and config.is_file():
        try:
            values = json.loads(config.read_text())
            name = values.get("architecture") or values.get("model_type") or ""  # HF folders: model_type
        except json.JSONDecodeError:
            name = ""
    return next((task for prefix, task in _PREFIXES if name.startswith(prefix)), "image-cls")


def eval_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 eval [<task>] [options]`."""
    argv = list(argv or [])
    if argv and argv[0] in TASKS:
        return _run(argv[0], "eval_main", argv[1:])
    return _run(task_of(argv), "eval_main", argv)


def predict_main(argv: Optional[List[str]] = None) -> int:
    argv = list(argv or [])
    return _run(task_of(argv), "predict_main", argv)
