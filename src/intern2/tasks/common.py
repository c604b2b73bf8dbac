"""CLI plumbing shared by the tasks: logging, the `intern2 train <task>` driver, loading a model for eval/predict."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Type

from torch import nn

__all__ = ["setup_logging", "train_cli", "add_model_arguments", "load_model", "model_from_args", "print_topk"]

log = logging.getLogger(__name__)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def train_cli(argv: Optional[List[str]], task_name: str, description: str, config_cls: Type,
              task_cls: Callable[[Any], Any], data_help: str, model_example: str, hide: tuple = ()) -> int:
    """`intern2 train <task_name>`: config from defaults, --config YAML and --set overrides; prints final metrics
    as one JSON line (without the keys in ``hide``)."""
    from ..config import load_config, to_dict
    from ..engine import Trainer
    parser = argparse.ArgumentParser(prog=f"intern2 train {task_name}", description=description)
    parser.add_argument("--config", help=f"YAML file with {config_cls.__name__} fields (model, data, train: {{...}})")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--model", help=f"registered model name, e.g. {model_example}")
    parser.add_argument("--out", help="output folder (train.out_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-3 --set train.epochs=30")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = list(args.overrides)
    for flag, key in ((args.data, "data"), (args.model, "model"), (args.out, "train.out_dir")):
        if flag is not None:
            overrides.insert(0, f"{key}={flag}")
    try:
        cfg = load_config(config_cls, args.config, overrides)
        task = task_cls(cfg)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    metrics = Trainer(task, cfg.train, config_to_save=to_dict(cfg)).fit()
    if getattr(task, "skipped", 0):
        log.warning("%d unreadable samples were skipped during training", task.skipped)
    print(json.dumps({k: v for k, v in metrics.items() if k not in hide}))
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint / --model (and the --task chosen by the dispatcher), shared by the commands that run a
    trained or official model."""
    parser.add_argument("--checkpoint", help="model folder, or a weight file used with --model")
    parser.add_argument("--model", help="registered model name (needed unless --checkpoint is a model folder)")
    parser.add_argument("--task",
                        help="image-cls, segment, detect or video-cls (default: from the model's architecture)")


def load_model(checkpoint: Optional[str], model_name: Optional[str]) -> nn.Module:
    """A folder written by training / save_pretrained (or an HF-hub InternImage folder), or ``model_name`` with an
    optional weight file in any supported layout; in eval mode."""
    from ..factory import create_model, from_pretrained
    if checkpoint and Path(checkpoint).is_dir():
        return from_pretrained(checkpoint).eval()
    if model_name is None:
        raise ValueError("--model is required unless --checkpoint is a model folder (config.json + weights)")
    if checkpoint is None:
        log.warning("no --checkpoint: %s has random weights", model_name)
    return create_model(model_name, checkpoint_path=checkpoint).eval()


def model_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> nn.Module:
    """:func:`load_model` for parsed CLI arguments; a bad model or file is a usage error naming it."""
    setup_logging()
    try:
        return load_model(args.checkpoint, args.model)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        parser.error(str(exc))


def print_topk(results: List[dict], as_json: bool) -> int:
    """Print per-file top-k results (JSON, or one line per file); errors go to stderr. Exit status: 1 when a file
    failed or none was given."""
    if as_json:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"error: {result['error']}", file=sys.stderr)
        elif not as_json:
            print(f"{result['file']}: " + ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in result["top"]))
    return 1 if any("error" in r for r in results) or not results else 0
