"""`intern2 export onnx`: a standard ONNX graph (DCNv3 becomes GridSample) of an image model, a video classifier or
a Mask R-CNN detector, checked with onnx and onnxruntime."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.onnx._constants import ONNX_MAX_OPSET  # the newest opset torch's exporter writes
# torchvision's detectors go through the TorchScript-based exporter, which writes opsets up to 20 (above, torch only
# warns and writes 20)
from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as DETECTOR_MAX_OPSET

__all__ = ["export_onnx", "export_detector_onnx", "needs_external_data", "main", "EXPORTABLE", "ExportCheckError"]

# What `intern2 export onnx` takes (task -> what it is called in messages).
EXPORTABLE = {"image-cls": "image classifiers", "segment": "UperNet segmentors (a fixed image size)",
              "video-cls": "video classifiers", "detect": "Mask R-CNN, Cascade Mask R-CNN and DINO "
              "detectors (a fixed image size)"}
DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")

log = logging.getLogger(__name__)


class ExportCheckError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes (nothing was written)."""


def needs_external_data(model: nn.Module) -> bool:
    """Whether the weights pass protobuf's 2 GB limit, so ONNX keeps them in a ``<file>.data`` file next to the graph
    (which then needs it); smaller models export as one self-contained file."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.8e9


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the export, back in its own mode after."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp_path)`` into a temp folder next to ``path``, then the files moved into place (an ONNX graph
    over 2 GB keeps its weights in a ``<name>.data`` file the graph names, so the graph is moved last): a failed
    export or check leaves no file and an existing ``path`` whole."""
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(folder / path.name)
        for item in sorted(folder.iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)
        created = []
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for parent in created:  # a failed export leaves no folder it made either
            with contextlib.suppress(OSError):
                parent.rmdir()


def _checked_session(target: Path, path: Path, quiet: bool = False) -> Any:
    """An onnxruntime session of the graph at ``target`` once onnx's full check passes; an invalid graph (the
    exporter's output, not the user's input) is an :class:`ExportCheckError` naming ``path``, where it would go.
    ``quiet``: onnxruntime logs errors only."""
    import onnx
    import onnxruntime as ort
    options = ort.SessionOptions()
    if quiet:
        options.log_severity_level = 3
    try:
        onnx.checker.check_model(str(target), full_check=True)
        return ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnx's ValidationError, onnxruntime's INVALID_GRAPH
        reason = " ".join(str(exc).split())[:200]
        raise ExportCheckError(f"{path}: the exported graph is not valid ONNX ({reason}); nothing written") from None


def export_onnx(model: nn.Module, path: Path, img_size: int, opset: int = 18, check: bool = True,
                atol: float = 1e-4, dynamic: bool = True, num_frames: Optional[int] = None) -> float:
    """Export with a dynamic batch, and dynamic height and width unless ``dynamic=False`` (then fixed at
    ``img_size``); returns max |onnxruntime - torch| on a test input of another batch (and size) (or -1 without the
    check), an :class:`ExportCheckError` beyond ``atol``. The file is written only once checked.

    ``num_frames``: a video classifier, input "video" (B, 3, num_frames, img_size, img_size); only its batch is
    dynamic (the graph holds the position table of that clip size)."""
    clip = () if num_frames is None else (num_frames,)
    spatial = dynamic and not clip
    # torch.export specialises size-1 dimensions: trace at a size whose last level is still >= 2x2.
    trace_size = max(img_size, 64) if spatial else img_size
    example = torch.randn(2, 3, *clip, trace_size, trace_size, generator=torch.Generator().manual_seed(0))
    name = next(iter(inspect.signature(model.forward).parameters))
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if spatial:
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})

    def write(target: Path) -> float:
        torch.onnx.export(model, (example,), str(target), dynamo=True, opset_version=opset,
                          input_names=["video" if clip else "image"], output_names=["output"],
                          dynamic_shapes={name: dims}, external_data=needs_external_data(model))
        if not check:
            return -1.0
        session = _checked_session(target, path)
        probe_shape = (3, 3, img_size, img_size + 32) if spatial else (3, 3, *clip, img_size, img_size)
        probe = torch.randn(*probe_shape, generator=torch.Generator().manual_seed(1))
        (got,) = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[:1]
        with torch.no_grad():
            want = model(probe)
        diff = float((torch.from_numpy(got) - want).abs().max())
        if diff > atol:
            raise ExportCheckError(f"{path}: onnxruntime output differs from PyTorch by {diff:.2e} (> {atol}); "
                                   f"nothing written")
        return diff
    result = []
    with _eval_mode(model):
        _write_atomically(path, lambda target: result.append(write(target)))
    return result[0]


def _matched_order(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], atol: float) -> Optional[torch.Tensor]:
    """For each of PyTorch's detections, the index of onnxruntime's that matches it (same label, score within
    ``atol``, nearest box), or None where that is not one-to-one. Detections whose scores tie within rounding may
    leave NMS and top-k in either order, so rows are matched, not compared by position."""
    if got["boxes"].shape != want["boxes"].shape:
        return None
    compatible = (want["labels"][:, None] == got["labels"][None]) & \
        ((want["scores"][:, None] - got["scores"][None]).abs() <= atol)
    distance = (want["boxes"][:, None] - got["boxes"][None]).abs().amax(-1).masked_fill(~compatible, float("inf"))
    if not len(distance):
        return torch.zeros(0, dtype=torch.long)
    order = distance.argmin(1)
    if order.unique().numel() != len(order) or not torch.isfinite(distance.gather(1, order[:, None])).all():
        return None
    return order


def export_detector_onnx(model: nn.Module, path: Path, size: Tuple[int, int], opset: int = 18, check: bool = True,
                         atol: float = 1e-4, box_atol: float = 0.25) -> Tuple[float, List[str]]:
    """Export a detector (Mask R-CNN, Cascade Mask R-CNN, DINO) for one (height, width): input ``image`` (3, H, W)
    RGB in [0, 1]; outputs ``boxes`` (N, 4) x1 y1 x2 y2 in pixels, ``labels`` (N,), ``scores`` (N,) and, with a
    mask head, ``masks`` (N, 1, H, W) probabilities: the whole pipeline (resize, normalisation, RPN, NMS, RoI heads,
    mask pasting; DINO's deformable attention as grid_sample) is in the graph. Returns max |onnxruntime - torch| of
    the scores on a test image (or -1 without the check) and the output names; a different number of detections,
    other labels, scores beyond ``atol`` or boxes beyond ``box_atol`` pixels (float32 sums in another order, through
    a deep network) is an error.

    torchvision's detection code is traceable (its ``_is_tracing`` paths keep box counts dynamic), not
    torch.export-able, so this uses the TorchScript-based exporter; the image size is fixed because the resize
    computes its output size in Python; that exporter writes opsets up to 20."""
    if opset > DETECTOR_MAX_OPSET:
        raise ValueError(f"opset {opset}: a detector exports with torch's TorchScript-based exporter, which writes "
                         f"opsets up to {DETECTOR_MAX_OPSET}")
    height, width = size
    example = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    result = []
    with _eval_mode(model):
        with torch.no_grad():  # box-only detectors (DINO) have no masks output
            outputs = [name for name in DETECTION_OUTPUTS if name in model([example])[0]]
        _write_atomically(path, lambda target: result.append(
            _write_detector(model, target, path, example, outputs, opset, check, atol, box_atol)))
    return result[0], outputs


def _write_detector(model: nn.Module, target: Path, path: Path, example: torch.Tensor, outputs: List[str],
                    opset: int, check: bool, atol: float, box_atol: float) -> float:
    """Trace ``model`` into ``target`` and check it there (``path`` is where it will be, for the messages)."""
    import warnings
    with warnings.catch_warnings():  # the tracer warns about every Python-level size it records
        warnings.simplefilter("ignore")
        torch.onnx.export(model, ([example],), str(target), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=outputs,
                          dynamic_axes={name: {0: "objects"} for name in outputs})
    if not check:
        return -1.0
    # torchvision's traced mask paste loop declares one object; onnxruntime warns once per object it sees.
    session = _checked_session(target, path, quiet=True)
    probe = torch.rand(*example.shape, generator=torch.Generator().manual_seed(1))
    got = dict(zip(outputs, session.run(None, {"image": probe.numpy()})))
    with torch.no_grad():
        want = model([probe])[0]
    order = _matched_order({k: torch.from_numpy(got[k]) for k in ("boxes", "scores", "labels")}, want, atol)
    if got["boxes"].shape != tuple(want["boxes"].shape) or order is None:
        raise ExportCheckError(f"{path}: onnxruntime finds {len(got['boxes'])} objects, PyTorch "
                               f"{len(want['boxes'])} (or other labels); nothing written")
    diffs = {k: float((torch.from_numpy(got[k])[order] - want[k]).abs().max()) if want[k].numel() else 0.0
             for k in ("boxes", "scores")}
    if diffs["scores"] > atol or diffs["boxes"] > box_atol:
        raise ExportCheckError(f"{path}: onnxruntime differs from PyTorch by {diffs['scores']:.2e} in scores (at "
                               f"most {atol}) and {diffs['boxes']:.2e} px in boxes (at most {box_atol}); nothing "
                               f"written")
    return diffs["scores"]


def main(argv: Optional[List[str]] = None) -> int:
    from .pipelines.common import add_model_arguments, load_model, model_task, setup_logging
    from .pipelines.common import pair
    parser = argparse.ArgumentParser(prog="intern2 export", description="Export an image model, a video "
                                     "classifier (a video ViT: fixed clip size, dynamic batch) or a Mask R-CNN "
                                     "detector (one image of a fixed size, post-processing in the graph).")
    parser.add_argument("format", choices=["onnx"])
    add_model_arguments(parser, run_options=False)  # the graph is float32 and its task is the model's
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--img-size", type=int, help="example input size (default: the model's input size)")
    parser.add_argument("--image-size", type=pair, metavar="H,W", help="a detector's input height and width "
                        "(default: its test size, e.g. 800,1333); resize images to it before inference")
    parser.add_argument("--opset", type=int, default=18, help=f"ONNX opset, 17 to {ONNX_MAX_OPSET} (what torch's "
                        f"exporter writes; detectors up to {DETECTOR_MAX_OPSET})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. --set depths=[1,1,2,1] (with --model)")
    parser.add_argument("--static", action="store_true", help="fixed height and width (--img-size) instead of "
                        "dynamic ones; the batch stays dynamic (segmentors always export at a fixed size)")
    parser.add_argument("--no-check", action="store_true", help="skip onnx.checker and the onnxruntime parity check")
    args = parser.parse_args(argv)
    setup_logging()  # onnx / onnxscript log at INFO by the thousand: libraries stay at WARNING unless -v
    if not 17 <= args.opset <= ONNX_MAX_OPSET:  # above it the exporter writes a graph onnx refuses
        parser.error(f"--opset {args.opset}: expected 17 to {ONNX_MAX_OPSET}")
    from .checkpoint import check_output
    from .config import error_message, parse_assignments
    try:
        check_output(args.out, "--out")
        overrides = parse_assignments(args.overrides)
        if overrides and not args.model:
            parser.error("--set needs --model")
        if overrides:
            from .factory import create_model
            model = create_model(args.model, checkpoint_path=args.checkpoint, **overrides).eval()
        else:
            model = load_model(args.checkpoint, args.model)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        parser.error(error_message(exc))
    model = model.float()  # the graph is float32, also of a model saved in bfloat16
    task = model_task(model)
    source = args.checkpoint or args.model
    if task not in EXPORTABLE or getattr(model, "features_only", False):
        what = "features_only backbone" if task in EXPORTABLE else f"{task or type(model).__name__} model"
        parser.error(f"{source}: a {what} cannot be exported to ONNX yet; intern2 exports "
                     f"{', '.join(EXPORTABLE.values())}")
    try:
        return _export(parser, args, model, task)
    except ExportCheckError as exc:  # valid input, a graph that does not compute what the model does
        print(f"intern2 export: error: {exc}", file=sys.stderr)
        return 1


def _export(parser: argparse.ArgumentParser, args: argparse.Namespace, model: nn.Module, task: str) -> int:
    from .weights import MAX_SIDE
    if task == "detect":
        if args.img_size is not None:
            parser.error("--img-size is an image model's option; a detector takes --image-size H,W")
        test_size = getattr(model, "pretrained_cfg", {}).get("test_size", (1333, 800))
        size = args.image_size or (min(test_size), max(test_size))
        if max(size) > MAX_SIDE:
            parser.error(f"--image-size {size[0]},{size[1]}: expected at most {MAX_SIDE} pixels a side")
        if args.opset > DETECTOR_MAX_OPSET:
            parser.error(f"--opset {args.opset}: a detector exports with opsets 17 to {DETECTOR_MAX_OPSET} (torch's "
                         f"TorchScript-based exporter; image models and video classifiers take up to {ONNX_MAX_OPSET})")
        diff, outputs = export_detector_onnx(model, Path(args.out), size, args.opset, check=not args.no_check)
        check = f" (onnxruntime vs torch max |diff| {diff:.2e})" if diff >= 0 else ""
        print(f"wrote {args.out}: input image (3, {size[0]}, {size[1]}) in [0, 1]; outputs "
              f"{', '.join(outputs)}{check}")
        return 0
    if args.image_size:
        parser.error("--image-size is a detector's option; image models and video classifiers take --img-size")
    cfg = getattr(model, "pretrained_cfg", {})
    input_size = cfg.get("input_size", (3, cfg.get("crop_size", 224)))
    num_frames = input_size[1] if len(input_size) == 4 else None  # (3, T, H, W): a video classifier
    # A segmentor exports at one size: by default its test protocol's short side (512 for ADE20K's 2048 x 512).
    default = min(cfg["test_size"]) if task == "segment" and cfg.get("test_size") else input_size[-1]
    size = args.img_size if args.img_size is not None else default
    if not 1 <= size <= MAX_SIDE:
        parser.error(f"--img-size {size}: expected a positive number of pixels, at most {MAX_SIDE}")
    try:  # a size the model cannot take fails here in one line, not deep in the exporter
        with torch.no_grad():
            model(torch.zeros(1, 3, *(() if num_frames is None else (num_frames,)), size, size))
    except (ValueError, RuntimeError, AssertionError) as exc:
        reason = " ".join(str(exc).split())[:200]
        parser.error(f"--img-size {size}: the model cannot take a {size}x{size} input ({reason})")
    # UperNet's resize of its logits to the input is traced at one size: a dynamic graph would be wrong elsewhere.
    static = args.static or task == "segment"
    diff = export_onnx(model, Path(args.out), size, args.opset, check=not args.no_check, dynamic=not static,
                       num_frames=num_frames)
    shape = (f"video (B, 3, {num_frames}, {size}, {size})" if num_frames else
             f"image (B, 3, {size}, {size})" if static else "image (B, 3, H, W)")
    data = f" and its weights {args.out}.data (keep them together)" if needs_external_data(model) else ""
    print(f"wrote {args.out}{data}: input {shape}"
          + (f" (onnxruntime vs torch max |diff| {diff:.2e})" if diff >= 0 else ""))
    return 0
