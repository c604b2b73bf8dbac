"""`intern2 demo`: the project's main job on built-in data, made of the shipped recipes (`intern2 recipes`).

Stages (each trains on data that ships with the package or is generated; no download):
1. dcnv3: the operator's implementations agree, the fast CPU path is timed against the readable reference, and
   free offsets are fitted by gradient descent until they recover a known displacement field.
2. digits: a small InternImage on scikit-learn's handwritten digits (recipe digits).
3. segmentation / 4. detection: UperNet and Mask R-CNN with a small InternImage on the generated shapes (recipes
   shapes-segment, shapes-detect); the detector starts from the segmentation stage's backbone when that ran.
5. video: VideoMAE pre-training of a tiny video ViT on the generated action clips, fine-tuned, next to the same
   fine-tuning from scratch (recipes actions-pretrain, actions-finetune).
6. localization: ActionFormer on snippet features of generated untrimmed videos, extracted by the video stage's
   encoder (recipe untrimmed-localize).
7. video_text: a tiny InternVideo-MM dual encoder on the clips' captions (recipe actions-text).
8. translation: a small NLLB-architecture model on CLDR phrases (recipe babel-translate).

Budgets are steps (and epochs), everything is seeded: two runs on one machine give the same figures (except the
DCNv3 timing), a busy machine is slower, never different. Each stage's check compares a figure with a baseline
measured in the same run. Writes <out>/summary.json (schema_version 1; paths relative to <out>) after every stage,
and <out>/report.html (one self-contained page).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..pipelines.common import output_or_exit, positive
from .stages import STAGES, Stage

__all__ = ["main", "SCHEMA_VERSION"]

log = logging.getLogger("intern2.demo")
SCHEMA_VERSION = 1



def cpu_name() -> str:
    """The CPU's model name (lscpu's), for the figures' provenance."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_outputs(summary: Dict[str, Any], out_dir: Path) -> None:
    from ..checkpoint import atomic_write
    from .report import write_report
    text = json.dumps(summary, indent=2)
    atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
    write_report(summary, out_dir)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for summary.json, report.html and the runs")
    parser.add_argument("--only", help=f"comma-separated stages to run (default: all of {','.join(STAGES)})")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiplier of every recipe's training steps (1.0: about 13 minutes on 2 CPU cores)")
    parser.add_argument("--steps", type=positive(int), default=300, help="optimisation steps of the displacement fit")
    parser.add_argument("--rounds", type=positive(int), default=5, help="timing rounds of the DCNv3 paths")
    args = parser.parse_args(argv)
    asked = list(STAGES) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in asked if s not in STAGES]
    if unknown or not asked:
        parser.error(f"--only: {f'unknown stages {unknown}' if unknown else 'no stage given'}; known: "
                     f"{', '.join(STAGES)}")
    names = [s for s in STAGES if s in asked]  # once each, in the demo's order (detection reuses segmentation)
    out_dir = output_or_exit(parser, args.out, "--out", folder=True)
    # Each stage replaces its folder: only in a folder the demo owns (new, empty, or with its summary.json).
    owned = not out_dir.exists() or (out_dir / "summary.json").is_file() or not any(out_dir.iterdir())
    if not owned and any((out_dir / name).exists() for name in names):
        clash = next(name for name in names if (out_dir / name).exists())
        parser.error(f"--out {args.out}: it holds {clash}/, which the demo would replace, and no demo summary.json; "
                     f"choose a new folder")
    if not 0 < args.budget <= 1000:  # a finite scale: --budget inf would ask for infinitely many steps
        parser.error(f"--budget: expected a number in (0, 1000], got {args.budget}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("intern2.engine", "intern2.data", "intern2.checkpoint", "intern2.tasks"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # the stages log their own summaries
    from .. import __version__
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {"schema_version": SCHEMA_VERSION, "intern2": __version__, "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "cpu": cpu_name(), "budget": args.budget,
                               "stages": {}}
    started = time.perf_counter()
    for name in names:
        stage_started = time.perf_counter()
        folder = out_dir / name
        if folder.exists():
            shutil.rmtree(folder)  # re-running reuses nothing stale
        folder.mkdir(parents=True)
        stage = Stage(out_dir, folder, args.budget, summary["stages"], {"steps": args.steps, "rounds": args.rounds})
        try:
            result = STAGES[name](stage)
        except ImportError as exc:  # an optional extra is not installed
            result = {"error": f"skipped: {exc}", "ok": False}
            log.warning("  %s skipped: %s", name, exc)
        result["seconds"] = round(time.perf_counter() - stage_started, 1)
        summary["stages"][name] = result
        summary["total_seconds"] = round(time.perf_counter() - started, 1)
        _write_outputs(summary, out_dir)
    log.info("summary: %s\nreport:  %s", out_dir / "summary.json", out_dir / "report.html")
    failed = [name for name in names if not summary["stages"][name].get("ok")]
    if failed:
        log.warning("stages below their expected figures: %s", ", ".join(failed))
    return 1 if failed else 0
