"""Semantic segmentation: an image in, a class per pixel (and each class's share of the image) out, computed as
mmseg's test pipeline computes it for the official checkpoints (see :class:`~intern2.weights.SegmentationProtocol`).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data.images import load_image
from ..data.segmentation import keep_ratio_size
from ..weights import SegmentationProtocol
from .common import (Pipeline, add_model_arguments, image_files_or_exit, model_dtype, one_or_many, output_or_exit,
                     pair, pipeline_from_args, run_on_images)

__all__ = ["SegmentationPipeline", "eval_input_size", "segment_probabilities", "segment_labels", "slide_inference",
           "palette", "colourise", "image_tensor", "predict_main"]

Pair = Tuple[int, int]
BAND_BYTES = 64 << 20  # probabilities resized at a time (~27 rows of a 4000 px wide photo on 150 classes)


def image_tensor(image: Union[Image.Image, np.ndarray]) -> torch.Tensor:
    """(3, H, W) float in [0, 1] of an RGB image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255


def eval_input_size(height: int, width: int, protocol: SegmentationProtocol, ratio: float = 1.0) -> Pair:
    """The (h, w) the model sees for an image of ``height`` x ``width``: mmseg's keep-ratio ``Resize`` into
    ``ratio`` x ``test_size`` (``MultiScaleFlipAug`` truncates the scaled bound), then ``ResizeToMultiple``
    (each side rounded up to a multiple of ``size_divisor``)."""
    bound = tuple(int(side * ratio) for side in protocol.test_size)
    h, w = keep_ratio_size(height, width, bound)
    divisor = protocol.size_divisor
    return (math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor) if divisor else (h, w)


def _resize(image: torch.Tensor, size: Pair) -> torch.Tensor:
    """Bilinear resize (half-pixel centres, as cv2's INTER_LINEAR) of a [0, 1] image. mmcv resizes the uint8
    image, so its values may differ from these by one level; the sizes are exactly mmseg's."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def slide_inference(model: nn.Module, images: torch.Tensor, crop: Pair, stride: Pair) -> torch.Tensor:
    """mmseg's sliding-window inference: the logits of overlapping (h, w) ``crop`` windows every ``stride``,
    averaged where they overlap; windows at the far edges are shifted inside the image."""
    n, _, height, width = images.shape
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    logits = images.new_zeros(n, model.num_classes, height, width)
    counts = images.new_zeros(1, 1, height, width)
    for r in range(max(height - crop_h + stride_h - 1, 0) // stride_h + 1):
        for c in range(max(width - crop_w + stride_w - 1, 0) // stride_w + 1):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            logits[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2])
            counts[:, :, y1:y2, x1:x2] += 1
    return logits / counts


def _views(protocol: SegmentationProtocol, tta: bool) -> List[Tuple[float, bool]]:
    """(ratio, flip) of each test view: ``protocol.tta_ratios`` (x2 with flips) with ``tta``, else the one view."""
    if not tta:
        return [(1.0, False)]
    return [(r, f) for r in protocol.tta_ratios for f in ((False, True) if protocol.tta_flip else (False,))]


@torch.no_grad()
def _view_logits(model: nn.Module, image: torch.Tensor, protocol: SegmentationProtocol, ratio: float,
                 flip: bool) -> torch.Tensor:
    """(1, num_classes, h, w) float logits of one view, at the size the model sees (not yet at the image's)."""
    device, dtype = next(model.parameters()).device, model_dtype(model)
    mean = torch.tensor(protocol.mean, device=device).view(3, 1, 1)
    std = torch.tensor(protocol.std, device=device).view(3, 1, 1)
    x = (_resize(image, eval_input_size(*image.shape[-2:], protocol, ratio)).to(device) - mean) / std
    x = (x.flip(-1)[None] if flip else x[None]).to(dtype)
    logits = slide_inference(model, x, protocol.slide_crop, protocol.stride) if protocol.slide_crop else model(x)
    return logits.float()


def _rows_probabilities(logits: torch.Tensor, rows: slice, size: Pair, flip: bool) -> torch.Tensor:
    """(num_classes, len(rows), W) softmax of ``logits`` (1, C, h, w) resized bilinearly to ``size`` (H, W), for
    output ``rows`` only: the numbers of ``F.interpolate(logits, size, mode="bilinear")[..., rows, :]`` (source rows
    and weights by ATen's half-pixel rule), without the other rows' C x W floats; flipped back along the width for a
    flipped view."""
    (height, width), source_height, device = size, logits.shape[-2], logits.device
    centres = (torch.arange(rows.start, rows.stop, dtype=torch.float32, device=device) + 0.5) \
        * (source_height / height) - 0.5
    centres = centres.clamp(min=0)
    top = centres.long().clamp(max=source_height - 1)
    bottom = (top + 1).clamp(max=source_height - 1)
    weight = (centres - top).clamp(0, 1).view(-1, 1)
    first, last = int(top[0]), int(bottom[-1]) + 1
    # Along the width first, on the source rows this band needs (their count kept: an identity along the height),
    # then the blend of each output row's two source rows.
    across = F.interpolate(logits[:, :, first:last], size=(last - first, width), mode="bilinear",
                           align_corners=False)[0]
    probs = torch.lerp(across[:, top - first], across[:, bottom - first], weight).softmax(0)
    return probs.flip(-1) if flip else probs


def _bands(height: int, width: int, classes: int, band_bytes: int) -> Iterator[slice]:
    """Slices of consecutive rows whose (classes, rows, width) float32 probabilities fit in ``band_bytes`` (a band
    holds a few such tensors at once: the two source rows gathered, their blend, its softmax)."""
    step = max(1, band_bytes // (4 * classes * width))
    return (slice(start, min(start + step, height)) for start in range(0, height, step))


@torch.no_grad()
def segment_probabilities(model: nn.Module, image: torch.Tensor, protocol: SegmentationProtocol,
                          tta: bool = False, band_bytes: int = BAND_BYTES) -> torch.Tensor:
    """(num_classes, H, W) class probabilities of a (3, H, W) [0, 1] image at its own size.

    Per view: resize as :func:`eval_input_size`, normalise, whole-image or sliding-window logits, bilinear back to
    the image size, softmax. With ``tta`` the views are ``protocol.tta_ratios`` (x2 with flips) and their
    probabilities are averaged, as mmseg's ``aug_test``; without, the single view at ratio 1. Each view is resized
    and added in bands of rows of ``band_bytes``, so the result (4 bytes per class and pixel) is the one full-size
    tensor; :func:`segment_labels` gives the class map without it.
    """
    height, width = image.shape[-2:]
    views = _views(protocol, tta)
    total = None
    for ratio, flip in views:
        logits = _view_logits(model, image, protocol, ratio, flip)
        if total is None:
            total = logits.new_zeros(logits.shape[1], height, width)
        for rows in _bands(height, width, logits.shape[1], band_bytes):
            total[:, rows] += _rows_probabilities(logits, rows, (height, width), flip)
    return total.div_(len(views)).cpu()


@torch.no_grad()
def segment_labels(model: nn.Module, image: torch.Tensor, protocol: SegmentationProtocol, tta: bool = False,
                   band_bytes: int = BAND_BYTES) -> torch.Tensor:
    """(H, W) int64 class index per pixel: the argmax of :func:`segment_probabilities`. Without ``tta`` it is taken
    band by band, so memory follows the model's input size, not the image's (a 12-megapixel photo on a 150-class
    model would otherwise hold 7 GB of probabilities); test-time augmentation averages its views in the one
    full-size sum."""
    if tta:
        return segment_probabilities(model, image, protocol, True, band_bytes).argmax(0)
    height, width = image.shape[-2:]
    logits = _view_logits(model, image, protocol, 1.0, False)
    labels = torch.empty(height, width, dtype=torch.int64)
    for rows in _bands(height, width, logits.shape[1], band_bytes):
        labels[rows] = _rows_probabilities(logits, rows, (height, width), False).argmax(0).cpu()
    return labels


def palette(count: int) -> np.ndarray:
    """Distinct colours per class (deterministic); class 0 (background-ish) is dark."""
    colours = np.random.default_rng(1234).integers(40, 256, (max(count, 1), 3)).astype(np.uint8)
    colours[0] = (20, 20, 20)
    return colours


def colourise(image: Image.Image, prediction: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a colour per class over the image."""
    overlay = palette(int(prediction.max()) + 1)[prediction]
    return Image.fromarray((np.asarray(image, dtype=np.float32) * (1 - alpha) + overlay * alpha).astype(np.uint8))


class SegmentationPipeline(Pipeline):
    """``pipeline(image) -> {"width", "height", "classes": [{"label", "index", "fraction", "colour"}],
    "prediction": (H, W) int64 class map}``, classes by decreasing share of the image.

    ``tta``: multi-scale + flip test-time augmentation with the protocol's ratios (the published "ms" numbers);
    protocol fields (``test_size``, ``size_divisor``, ``slide_crop``, ``slide_stride``) may be overridden.
    """

    task = "segment"
    expects = "a semantic segmentation model (UperNet or Mask2Former)"
    protocol: SegmentationProtocol

    def __init__(self, model: nn.Module, source: Optional[str] = None, tta: bool = False, **protocol: Any):
        super().__init__(model, source, **protocol)
        self.tta = tta

    @classmethod
    def model_types(cls) -> Tuple[type, ...]:
        from ..models.mask2former import Mask2Former
        from ..models.upernet import UperNet
        return (UperNet, Mask2Former)

    def input_size(self, height: int, width: int) -> Pair:
        """The size the model sees for an image of ``height`` x ``width`` (without test-time augmentation)."""
        return eval_input_size(height, width, self.protocol)

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """(num_classes, H, W) probabilities of a (3, H, W) [0, 1] image."""
        return segment_probabilities(self.model, image, self.protocol, self.tta)

    def predict(self, image: Union[Image.Image, str]) -> np.ndarray:
        """(H, W) int64 class index per pixel."""
        image = load_image(image)
        return segment_labels(self.model, image_tensor(image), self.protocol, self.tta).numpy()

    def describe(self, prediction: np.ndarray) -> List[Dict[str, Any]]:
        """Each present class with its share of the pixels and its overlay colour, largest first."""
        counts = np.bincount(prediction.ravel(), minlength=len(self.labels))
        colours = palette(len(self.labels))
        return [{"label": self.labels[i], "index": i, "fraction": round(float(counts[i]) / prediction.size, 6),
                 "colour": "#%02x%02x%02x" % tuple(int(c) for c in colours[i])}
                for i in np.argsort(-counts, kind="stable").tolist() if counts[i]]

    def mask_image(self, prediction: np.ndarray) -> Image.Image:
        """The class map as a greyscale PNG-ready image (8-bit, 16-bit for more than 256 classes)."""
        return Image.fromarray(prediction.astype(np.uint8 if len(self.labels) <= 256 else np.uint16))

    @one_or_many
    def __call__(self, image: Union[Image.Image, str]) -> Dict[str, Any]:
        image = load_image(image)
        prediction = self.predict(image)
        return {"width": image.width, "height": image.height, "classes": self.describe(prediction),
                "prediction": prediction}


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The segmentation protocol overrides shared by `intern2 predict` and `intern2 eval`."""
    parser.add_argument("--test-size", type=pair, metavar="LONG,SHORT",
                        help="keep-ratio test bound (mmseg img_scale; default: the weights' protocol, e.g. 2048,512)")
    parser.add_argument("--size-divisor", type=int, metavar="N",
                        help="resize each side up to a multiple of N (default: the protocol's, 32; 0: off)")
    parser.add_argument("--slide", type=pair, metavar="H,W", help="sliding-window inference with H x W windows")
    parser.add_argument("--slide-stride", type=pair, metavar="H,W", help="window stride (default: 2/3 of --slide)")
    parser.add_argument("--tta", action="store_true",
                        help="multi-scale + flip test-time augmentation (the published multi-scale numbers)")


def protocol_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Pipeline keyword arguments of :func:`add_protocol_arguments`' options (absent ones keep the protocol)."""
    divisor = args.size_divisor
    options = dict(test_size=args.test_size, slide_crop=args.slide, slide_stride=args.slide_stride, tta=args.tta)
    if divisor is not None:
        options["size_divisor"] = divisor or None
    return options


def predict_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 predict", description="Segment images.")
    parser.add_argument("images", nargs="+", help="image files or folders of them")
    add_model_arguments(parser)
    add_protocol_arguments(parser)
    parser.add_argument("--out", default="predictions", help="folder for overlays (<name>_seg.png) and masks")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    files = image_files_or_exit(parser, args.images)
    out = output_or_exit(parser, args.out, "--out", folder=True)
    pipeline = pipeline_from_args(parser, args, SegmentationPipeline, **protocol_options(args))

    def run(file: str, image: Image.Image) -> Dict[str, Any]:
        result = pipeline(image)
        prediction = result.pop("prediction")
        overlay, mask = (out / f"{Path(file).stem}_{kind}.png" for kind in ("seg", "mask"))
        colourise(image, prediction).save(overlay)
        pipeline.mask_image(prediction).save(mask)
        return {"overlay": str(overlay), "mask": str(mask), **result}
    results, failed = run_on_images(files, out, run, "{stem}_seg.png")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            shares = ", ".join(f"{c['label']} {c['fraction']:.1%}" for c in r["classes"])
            print(f"{r['file']}: {shares} -> {r['overlay']}")
    return 1 if failed else 0
