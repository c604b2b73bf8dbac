"""`intern2 <command> [args]`: every command is a ``main(argv) -> int`` that tests call in-process.

:func:`main` is the one error boundary of the command line: a failure caused by the user's input (a file, a
value, a missing optional package: ``ValueError``, ``OSError``, ``KeyError``, ``ImportError``) ends in one line
on stderr naming it, and exit code 2; anything else (an internal bug) keeps its traceback, and ``--debug`` (or
``INTERN2_DEBUG=1``) shows the traceback of every failure. Library logs stay at WARNING unless ``-v``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from typing import Dict, List, Optional, Tuple

# command -> (module:function, one-line help). Modules are imported only when their command runs.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "list": ("intern2.cli:list_main", "list registered models, or with --pretrained their pretrained tags"),
    "recipes": ("intern2.recipes:recipes_main", "list the shipped training recipes (small CPU configurations)"),
    "demo": ("intern2.demo:main", "run the end-to-end demonstration on built-in data"),
    "train": ("intern2.tasks:train_main",
              "train a model: intern2 train image-cls|segment|detect|video-pretrain|video-cls ..."),
    "eval": ("intern2.tasks:eval_main", "evaluate a model on a dataset (accuracy, mIoU, COCO AP)"),
    "eval-tal": ("intern2.tasks.tal:eval_tal_main",
                 "temporal action localization mAP of a predictions file (THUMOS14 / ActivityNet protocol)"),
    "predict": ("intern2.pipelines:predict_main",
                "run a model on image or video files (labels, overlays, detections)"),
    "extract-features": ("intern2.pipelines.video_cls:extract_features_main",
                         "pooled video features per file, to .safetensors or .npy"),
    "retrieve": ("intern2.pipelines.video_text:retrieve_main", "rank videos by a text query with a video-text model"),
    "zero-shot": ("intern2.pipelines.video_text:zero_shot_main", "classify videos against free-text labels"),
    "embed": ("intern2.pipelines.video_text:embed_main", "video and text embeddings to .safetensors or .npy"),
    "export": ("intern2.export:main", "export a model: intern2 export onnx ..."),
    "convert": ("intern2.convert:main", "convert an official checkpoint into a model folder"),
    "translate": ("intern2.pipelines.translation:translate_main",
                  "translate text: intern2 translate --src eng_Latn --tgt fra_Latn 'Good morning'"),
    "languages": ("intern2.text.languages:main", "list the translation languages: intern2 languages --filter fra"),
    "serve": ("intern2.serve:main", "HTTP API + web page for the models: intern2 serve --image-model DIR ..."),
}


def list_main(argv: Optional[List[str]] = None) -> int:
    """Print registered model names (or, with --pretrained, every pretrained tag with its published metrics),
    optionally filtered by a shell pattern."""
    parser = argparse.ArgumentParser(prog="intern2 list", description=list_main.__doc__)
    parser.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'internimage_*'")
    parser.add_argument("--pretrained", action="store_true",
                        help="list pretrained tags (arch.tag), their task and published metrics")
    parser.add_argument("--json", action="store_true", help="print JSON: the names (with --pretrained: each tag's "
                        "full weights metadata)")
    args = parser.parse_args(argv)
    if args.pretrained:
        from .weights import get_weights, list_pretrained
        names = list_pretrained(args.pattern)
        if not names and args.pattern and "." not in args.pattern:  # an architecture's name: its tags
            names = list_pretrained(args.pattern + ".*")
        records = [get_weights(*name.split(".", 1)) for name in names]
        if args.json:
            print(json.dumps({r.name: r.pretrained_cfg() for r in records}, indent=2))
        for r in [] if args.json else records:
            metrics = "; ".join(f"{m.name} {m.value} ({m.dataset}, {m.protocol})" for m in r.metrics)
            print(f"{r.name:48} {r.task:14} {metrics}".rstrip())
    else:
        from .registry import list_models
        names = list_models(args.pattern)
        if args.json:
            print(json.dumps(names))
        elif names:
            print("\n".join(names))
    if not names:  # on stderr: stdout stays the (empty) listing, valid JSON with --json
        kind = "pretrained tag" if args.pretrained else "registered model"
        print(f"no {kind} matches {args.pattern!r}" if args.pattern else f"no {kind}s", file=sys.stderr)
        return 1 if args.pattern else 0
    return 0


# How `intern2 --help` groups the commands.
GROUPS = (("models", ("list", "convert", "export")),
          ("inference", ("predict", "eval", "eval-tal", "extract-features", "retrieve", "zero-shot", "embed",
                         "translate", "languages")),
          ("training", ("train", "recipes", "demo")),
          ("serving", ("serve",)))
# Optional packages -> the extra that installs them (pip install 'intern2[extra]').
EXTRAS = {"pycocotools": "data", "sklearn": "data", "av": "video", "sentencepiece": "text", "sacrebleu": "text",
          "babel": "text", "tokenizers": "videotext", "fastapi": "serve", "fastapi_offline": "serve",
          "uvicorn": "serve", "multipart": "serve", "httpx": "serve", "onnx": "export", "onnxruntime": "export",
          "onnxscript": "export", "timm": "timm"}
USER_ERRORS = (ValueError, OSError, KeyError, ImportError)


def _help() -> str:
    lines = ["usage: intern2 [-v] [--debug] <command> [options]", "",
             "INTERN 2.0 general models in plain PyTorch.", ""]
    for group, names in GROUPS:
        lines.append(f"{group}:")
        lines += [f"  {name:18} {COMMANDS[name][1]}" for name in names]
        lines.append("")
    lines += ["options:", "  -v, -vv            library logs at INFO (-vv: intern2's at DEBUG)",
              "  --debug            show the traceback of every failure", "  --version          print the version",
              "", "Run 'intern2 <command> --help' for a command's options."]
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    """The message of a user-caused failure, on one line; a missing optional package names its extra."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] in EXTRAS:
        package = exc.name.split(".")[0]
        return f"this needs the optional package {package!r}: pip install 'intern2[{EXTRAS[package]}]'"
    from .config import error_message
    text = error_message(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `intern2 languages | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: List[str]) -> int:
    verbose, debug = 0, os.environ.get("INTERN2_DEBUG", "") not in ("", "0")
    while argv and argv[0] in ("-v", "-vv", "--verbose", "--debug"):
        flag = argv.pop(0)
        debug = debug or flag == "--debug"
        verbose += 2 if flag == "-vv" else flag != "--debug"
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if argv[0] == "--version":
        from . import __version__
        print(f"intern2 {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"intern2: unknown command {command!r}; choose from {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    from .pipelines.common import setup_logging
    setup_logging(verbose)
    module_name, function = COMMANDS[command][0].split(":")
    try:
        return int(getattr(importlib.import_module(module_name), function)(rest) or 0)
    except KeyboardInterrupt:
        print(f"intern2 {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except SystemExit as stop:
        # A usage error raised while handling an exception (argparse's parser.error in an except block):
        # --debug shows the exception it reported.
        if debug and stop.code == 2 and stop.__context__ is not None:
            traceback.print_exception(stop.__context__)
        raise
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"intern2 {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a diverged training run: the input was valid, the run failed
        if debug:
            raise
        print(f"intern2 {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
