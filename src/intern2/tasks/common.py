"""The `intern2 train <task>` driver shared by the tasks (the model-loading and printing plumbing of the inference
commands lives in :mod:`intern2.pipelines.common`)."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Callable, Dict, List, Optional, Type

from ..checkpoint import check_output
from ..pipelines.common import setup_logging

__all__ = ["train_cli", "head_model_args"]

log = logging.getLogger(__name__)


def train_cli(argv: Optional[List[str]], task_name: str, description: str, config_cls: Type,
              task_cls: Callable[[Any], Any], data_help: str, model_example: str, hide: tuple = ()) -> int:
    """`intern2 train <task_name>`: config from defaults, --config YAML and --set overrides; prints final metrics
    as one JSON line (without the keys in ``hide``)."""
    from ..config import describe_fields, load_config, to_dict
    from ..engine import Trainer
    from ..recipes import get_recipe
    fields = "\n".join(describe_fields(config_cls))
    parser = argparse.ArgumentParser(
        prog=f"intern2 train {task_name}", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config fields (--set KEY=VALUE, or in --config YAML; values are YAML):\n{fields}")
    parser.add_argument("--config", help=f"YAML file with {config_cls.__name__} fields (model, data, train: {{...}})")
    parser.add_argument("--recipe", help="start from a shipped recipe (a small CPU configuration; list them with "
                        "'intern2 recipes'); --config and --set override it")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--model", help=f"registered model name, e.g. {model_example}")
    parser.add_argument("--out", help="output folder (train.out_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-3 --set train.epochs=30")
    args = parser.parse_args(argv)
    setup_logging()
    if args.data is not None and not args.data.strip():  # Path("") would read the current folder
        parser.error("--data: empty; expected a dataset path or a builtin: name")
    overrides = list(args.overrides)
    # The epochs asked for, not a step count from an earlier layer (a recipe's, or the --config file's).
    if _sets(overrides, "epochs") and not _sets(overrides, "max_steps"):
        overrides.append("train.max_steps=null")
    elif _file_sets(args.config, "epochs") and not _file_sets(args.config, "max_steps") and \
            not _sets(overrides, "max_steps"):
        overrides.insert(0, "train.max_steps=null")
    for flag, key in ((args.data, "data"), (args.model, "model"), (args.out, "train.out_dir")):
        if flag is not None:
            overrides.insert(0, f"{key}={flag}")
    try:
        recipe = get_recipe(args.recipe, task_name) if args.recipe else None
        cfg = load_config(config_cls, args.config, overrides, recipe and recipe.config,
                          f"recipe {args.recipe}")
        if cfg.model is not None:  # None: the task picks it (e.g. a checkpoint folder's architecture)
            _check_model_kind(cfg.model, config_cls().model or model_example, task_name)
        check_output(cfg.train.out_dir, "--out" if args.out is not None else "train.out_dir", folder=True)
        task = task_cls(cfg)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    metrics = Trainer(task, cfg.train, config_to_save=to_dict(cfg)).fit()
    if getattr(task, "skipped", 0):
        log.warning("%d unreadable samples were skipped during training", task.skipped)
    if metrics.get("count") == 0 and metrics.get("skipped", 0):  # the model is saved; its score is not known
        raise ValueError(f"validation data: all {metrics['skipped']} samples were unreadable, so the model saved "
                         f"in {cfg.train.out_dir}/model was not evaluated (the warnings above name the files)")
    print(json.dumps({k: v for k, v in metrics.items() if k not in hide}))
    return 0


def _sets(overrides: List[str], field: str) -> bool:
    """Whether the --set overrides give ``train.<field>``, as a key or inside a ``train={...}`` mapping."""
    import yaml
    for assignment in overrides:
        key, _, text = assignment.partition("=")
        if key.strip() == f"train.{field}":
            return True
        if key.strip() == "train":
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                continue  # load_config names the bad value
            if isinstance(value, dict) and field in value:
                return True
    return False


def _file_sets(path: Optional[str], field: str) -> bool:
    """Whether the --config YAML file gives ``train.<field>`` (an unreadable file: no; load_config names it)."""
    import yaml
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and isinstance(config.get("train"), dict) and field in config["train"]


def head_model_args(model_args: Optional[Dict[str, Any]], num_classes: int, data: str) -> Dict[str, Any]:
    """``model_args`` with the data's class count as ``num_classes``: the head follows the data, so a different
    count given there is a ValueError rather than a head that disagrees with the labels."""
    args = dict(model_args or {})
    given = args.pop("num_classes", None)
    if given is not None and given != num_classes:
        raise ValueError(f"model_args.num_classes: {given}, but data {data} has {num_classes} classes; leave it "
                         f"unset (the head is sized to the data's classes)")
    return {**args, "num_classes": num_classes}


def _check_model_kind(model: str, default: str, task_name: str) -> None:
    """A ValueError when ``model`` is registered for another task than the task's default model (a video ViT
    given to image-cls fails deep in the first forward pass otherwise)."""
    from ..weights import task_of
    expected, actual = task_of(default.partition(".")[0]), task_of(model.partition(".")[0])
    if expected and actual and actual != expected:
        raise ValueError(f"model {model!r} is a {actual} model, not {expected}; 'intern2 train {task_name}' "
                         f"trains models such as {default}")
