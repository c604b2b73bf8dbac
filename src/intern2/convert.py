"""`intern2 convert`: an official checkpoint (classification .pth, mmdet / mmseg file, HF folder) into a
``save_pretrained`` folder (config.json + model.safetensors) that ``intern2.from_pretrained`` loads."""
from __future__ import annotations

import argparse
from typing import List, Optional

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 convert", description=__doc__)
    parser.add_argument("--model", required=True, help="registered model, e.g. mask_rcnn_internimage_t")
    parser.add_argument("--checkpoint", required=True, help="the official weight file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override (e.g. num_classes=3) when the file is not the default config")
    args = parser.parse_args(argv)
    from pathlib import Path

    from .checkpoint import WEIGHTS_NAME, check_output
    from .config import error_message, parse_assignments
    from .factory import create_model, save_pretrained
    try:
        check_output(args.out, "--out", folder=True)
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()) and not (out / WEIGHTS_NAME).is_file():  # e.g. a training run
            raise ValueError(f"--out {args.out}: holds other files and no {WEIGHTS_NAME}; convert writes config.json "
                             f"and {WEIGHTS_NAME} there: choose a new or empty folder, or a model folder to replace")
        model = create_model(args.model, checkpoint_path=args.checkpoint, **parse_assignments(args.overrides))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        parser.error(error_message(exc))
    print(f"wrote {save_pretrained(model, args.out)}")
    return 0
