"""`intern2 <command> [args]`: every command is a ``main(argv) -> int`` that tests call in-process."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

# command -> (module:function, one-line help). Modules are imported only when their command runs.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "list": ("intern2.cli:list_main", "list registered models"),
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
    """Print registered model names, optionally filtered by a shell pattern."""
    parser = argparse.ArgumentParser(prog="intern2 list", description=list_main.__doc__)
    parser.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'internimage_*'")
    args = parser.parse_args(argv)
    from .registry import list_models
    names = list_models(args.pattern)
    if not names:
        print(f"no registered model matches {args.pattern!r}" if args.pattern else "no models registered")
        return 1 if args.pattern else 0
    print("\n".join(names))
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
