"""`intern2 <command> [args]`: every command is a ``main(argv) -> int`` that tests call in-process."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Dict, List, Optional, Tuple

# command -> (module:function, one-line help). Modules are imported only when their command runs.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "list": ("intern2.cli:list_main", "list registered models, or with --pretrained their pretrained tags"),
    "demo": ("intern2.demo:main", "run the end-to-end demonstration on built-in data"),
    "train": ("intern2.tasks:train_main",
              "train a model: intern2 train image-cls|segment|detect|video-pretrain|video-cls ..."),
    "eval": ("intern2.tasks:eval_main", "evaluate a model on a dataset (accuracy, mIoU, COCO AP)"),
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
    parser.add_argument("--json", action="store_true", help="with --pretrained: each tag's full weights metadata")
    args = parser.parse_args(argv)
    if args.pretrained:
        from .weights import get_weights, list_pretrained
        names = list_pretrained(args.pattern)
        records = [get_weights(*name.split(".", 1)) for name in names]
        if args.json:
            print(json.dumps({r.name: r.pretrained_cfg() for r in records}, indent=2))
        for r in [] if args.json else records:
            metrics = "; ".join(f"{m.name} {m.value} ({m.dataset}, {m.protocol})" for m in r.metrics)
            print(f"{r.name:48} {r.task:14} {metrics}".rstrip())
    else:
        from .registry import list_models
        names = list_models(args.pattern)
        print("\n".join(names)) if names else None
    if not names:
        kind = "pretrained tag" if args.pretrained else "registered model"
        print(f"no {kind} matches {args.pattern!r}" if args.pattern else f"no {kind}s")
        return 1 if args.pattern else 0
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intern2", description="INTERN 2.0 general models in plain PyTorch.",
        epilog="Run 'intern2 <command> --help' for a command's options.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="<command>",
                        help="; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items()))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from . import __version__
        print(f"intern2 {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(sorted(COMMANDS))}")
    module_name, function = COMMANDS[command][0].split(":")
    return int(getattr(importlib.import_module(module_name), function)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
