"""Tasks: dataset -> model -> loss -> metrics, plugged into the engine by `intern2 train <task>`.

`intern2 eval` picks the task from ``--task`` or from the model (its weights metadata or architecture name), and
evaluates through the task's pipeline (:mod:`intern2.pipelines`), so evaluation sees what `predict` sees.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

TASKS = {"image-cls": "intern2.tasks.image_cls", "segment": "intern2.tasks.segment",
         "detect": "intern2.tasks.detect", "video-cls": "intern2.tasks.video_cls",
         "video-pretrain": "intern2.tasks.video_pretrain", "video-text": "intern2.tasks.video_text",
         "umt": "intern2.tasks.umt", "translation": "intern2.tasks.translation", "tal": "intern2.tasks.tal"}


def _run(task: str, function: str, argv: List[str]) -> int:
    if task not in TASKS:
        print(f"intern2 {function[:-len('_main')]}: unknown task {task!r}; tasks: {', '.join(sorted(TASKS))}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(TASKS[task])
    if not hasattr(module, function):  # pre-training / distillation tasks have no eval or predict of their own
        command = function[:-len("_main")]
        print(f"intern2 {command}: task {task!r} has no '{command}' (it only trains; evaluate the models it "
              f"initialises)", file=sys.stderr)
        return 2
    return getattr(module, function)(argv)


def train_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 train <task> [options]`, or `intern2 train --recipe NAME [options]` (the recipe's task)."""
    argv = list(argv or [])
    if argv and argv[0] not in TASKS and argv[0].startswith("--recipe"):  # the recipe names its task
        from ..recipes import get_recipe
        name = argv[0].partition("=")[2] or (argv[1] if len(argv) > 1 else "")
        try:
            task = get_recipe(name).task
        except ValueError as exc:
            print(f"intern2 train: {exc}", file=sys.stderr)
            return 2
        return _run(task, "train_main", argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TASKS:
        known = ", ".join(sorted(TASKS))
        if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            print(f"intern2 train: error: expected a task before the options, got {argv[0]!r}; tasks: {known}",
                  file=sys.stderr)
            return 2
        if argv and argv[0] not in ("-h", "--help"):
            print(f"intern2 train: unknown task {argv[0]!r}; tasks: {known}", file=sys.stderr)
            return 2
        usage = f"usage: intern2 train <task> [options]   (tasks: {known}; 'intern2 train <task> --help' for options)"
        if not argv:  # a task is required, as argparse's required arguments are: usage on stderr, exit 2
            print(f"{usage}\nintern2 train: error: expected a task", file=sys.stderr)
            return 2
        print(usage)
        return 0
    return _run(argv[0], "train_main", argv[1:])


def eval_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 eval [<task>] [options]`."""
    argv = list(argv or [])
    if argv and argv[0] in TASKS:
        return _run(argv[0], "eval_main", argv[1:])
    from ..pipelines.common import task_of_arguments
    task = task_of_arguments(argv)
    if {"-h", "--help"} & set(argv) and "--task" not in argv:
        evaluable = sorted(name for name in TASKS if name not in ("umt", "video-pretrain"))
        print(f"intern2 eval evaluates the model's own task (or --task / a first argument): {', '.join(evaluable)};"
              f" each has its options: 'intern2 eval --task segment --help'. The {task} options:\n")
    return _run(task, "eval_main", argv)
