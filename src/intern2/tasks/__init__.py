"""Tasks: dataset -> model -> loss -> metrics, plugged into the engine by `intern2 train <task>`."""
from __future__ import annotations

import importlib
from typing import List, Optional

TASKS = {"image-cls": "intern2.tasks.image_cls:train_main"}


def train_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 train <task> [options]`."""
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TASKS:
        known = ", ".join(sorted(TASKS))
        print(f"usage: intern2 train <task> [options]   (tasks: {known}; 'intern2 train <task> --help' for options)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, function = TASKS[argv[0]].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])
