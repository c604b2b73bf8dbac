"""`intern2 export onnx`: a standard ONNX graph (DCNv3 becomes GridSample) of an image model, a video classifier or
a Mask R-CNN detector, checked with onnx and onnxruntime."""
from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["export_onnx", "export_detector_onnx", "main", "EXPORTABLE"]

# What `intern2 export onnx` takes (task -> what it is called in messages).
EXPORTABLE = {"image-cls": "image classifiers", "segment": "UperNet segmentors (--static)",
              "video-cls": "video classifiers", "detect": "Mask R-CNN, Cascade Mask R-CNN and DINO "
              "detectors (a fixed image size)"}
DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")

log = logging.getLogger(__name__)


def export_onnx(model: nn.Module, path: Path, img_size: int, opset: int = 18, check: bool = True,
                atol: float = 1e-4, dynamic: bool = True, num_frames: Optional[int] = None) -> float:
    """Export (dynamic batch, height and width unless ``dynamic=False``: then fixed at img_size); returns
    max |onnxruntime - torch| on a test input (or -1 without the check).

    ``num_frames``: a video classifier, input "video" (B, 3, num_frames, img_size, img_size); only its batch is
    dynamic (the graph holds the position table of that clip size)."""
    model = model.eval()
    clip = () if num_frames is None else (num_frames,)
    # torch.export specialises size-1 dimensions: trace at a size whose last level is still >= 2x2.
    trace_size = max(img_size, 64) if dynamic and not clip else img_size
    example = torch.randn(2 if dynamic else 1, 3, *clip, trace_size, trace_size,
                          generator=torch.Generator().manual_seed(0))
    shapes = None
    if dynamic:
        name = next(iter(inspect.signature(model.forward).parameters))
        dims = {0: torch.export.Dim("batch", min=1, max=1024)}
        if not clip:
            dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
        shapes = {name: dims}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                      input_names=["video" if clip else "image"], output_names=["output"], dynamic_shapes=shapes)
    if not check:
        return -1.0
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe_shape = example.shape
    if dynamic:
        probe_shape = (3, 3, *clip, img_size, img_size) if clip else (3, 3, img_size, img_size + 32)
    probe = torch.randn(*probe_shape, generator=torch.Generator().manual_seed(1))
    (got,) = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[:1]
    with torch.no_grad():
        want = model(probe)
    diff = float((torch.from_numpy(got) - want).abs().max())
    if diff > atol:
        raise RuntimeError(f"{path}: onnxruntime output differs from PyTorch by {diff:.2e} (> {atol})")
    return diff


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
    computes its output size in Python."""
    import warnings
    model = model.eval()
    height, width = size
    example = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # box-only detectors (DINO) have no masks output
        outputs = [name for name in DETECTION_OUTPUTS if name in model([example])[0]]
    with warnings.catch_warnings():  # the tracer warns about every Python-level size it records
        warnings.simplefilter("ignore")
        torch.onnx.export(model, ([example],), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=outputs,
                          dynamic_axes={name: {0: "objects"} for name in outputs})
    if not check:
        return -1.0, outputs
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    options = ort.SessionOptions()
    # torchvision's traced mask paste loop declares one object; onnxruntime warns once per object it sees.
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    probe = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1))
    got = dict(zip(outputs, session.run(None, {"image": probe.numpy()})))
    with torch.no_grad():
        want = model([probe])[0]
    order = _matched_order({k: torch.from_numpy(got[k]) for k in ("boxes", "scores", "labels")}, want, atol)
    if got["boxes"].shape != tuple(want["boxes"].shape) or order is None:
        raise RuntimeError(f"{path}: onnxruntime finds {len(got['boxes'])} objects, PyTorch {len(want['boxes'])} "
                           f"(or other labels)")
    diffs = {k: float((torch.from_numpy(got[k])[order] - want[k]).abs().max()) if want[k].numel() else 0.0
             for k in ("boxes", "scores")}
    if diffs["scores"] > atol or diffs["boxes"] > box_atol:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {diffs['scores']:.2e} in scores (at most "
                           f"{atol}) and {diffs['boxes']:.2e} px in boxes (at most {box_atol})")
    return diffs["scores"], outputs


def main(argv: Optional[List[str]] = None) -> int:
    from .pipelines.common import add_model_arguments, load_model, model_task, setup_logging
    from .pipelines.common import pair
    parser = argparse.ArgumentParser(prog="intern2 export", description="Export an image model, a video "
                                     "classifier (a video ViT: fixed clip size, dynamic batch) or a Mask R-CNN "
                                     "detector (one image of a fixed size, post-processing in the graph).")
    parser.add_argument("format", choices=["onnx"])
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--img-size", type=int, help="example input size (default: the model's input size)")
    parser.add_argument("--image-size", type=pair, metavar="H,W", help="a detector's input height and width "
                        "(default: its test size, e.g. 800,1333); resize images to it before inference")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; GridSample needs >= 16)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. --set depths=[1,1,2,1] (with --model)")
    parser.add_argument("--static", action="store_true", help="fixed input size (--img-size) instead of dynamic")
    parser.add_argument("--no-check", action="store_true", help="skip onnx.checker and the onnxruntime parity check")
    args = parser.parse_args(argv)
    setup_logging()  # onnx / onnxscript log at INFO by the thousand: libraries stay at WARNING unless -v
    if args.opset < 17:
        parser.error(f"--opset {args.opset}: expected >= 17")
    from .checkpoint import check_output
    from .config import error_message, parse_assignments
    from .weights import MAX_SIDE
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
    task = model_task(model)
    if task not in EXPORTABLE:
        parser.error(f"{args.checkpoint or args.model}: a {task or type(model).__name__} model cannot be exported to "
                     f"ONNX yet; intern2 exports {', '.join(EXPORTABLE.values())}")
    if task == "detect":
        test_size = getattr(model, "pretrained_cfg", {}).get("test_size", (1333, 800))
        size = args.image_size or (min(test_size), max(test_size))
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
    size = args.img_size if args.img_size is not None else input_size[-1]
    if not 1 <= size <= MAX_SIDE:
        parser.error(f"--img-size {size}: expected a positive number of pixels, at most {MAX_SIDE}")
    try:  # a size the model cannot take fails here in one line, not deep in the exporter
        with torch.no_grad():
            model(torch.zeros(1, 3, *(() if num_frames is None else (num_frames,)), size, size))
    except (ValueError, RuntimeError, AssertionError) as exc:
        reason = " ".join(str(exc).split())[:200]
        parser.error(f"--img-size {size}: the model cannot take a {size}x{size} input ({reason})")
    diff = export_onnx(model, Path(args.out), size, args.opset, check=not args.no_check, dynamic=not args.static,
                       num_frames=num_frames)
    print(f"wrote {args.out}" + (f" (onnxruntime vs torch max |diff| {diff:.2e})" if diff >= 0 else ""))
    return 0
