"""Object detection + instance segmentation: an image in, labelled boxes (and masks) out, with mmdet's test
protocol for the official checkpoints (see :class:`~intern2.weights.DetectionProtocol`).

Label convention: ``index`` is the class's 0-based position in the model's label list (COCO: 0 = person);
torchvision's internal label is ``index + 1`` (0 is its background).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..data.images import load_image
from ..heads.detection import paste_masks, unpasted_masks
from ..weights import DetectionProtocol
from .common import (Pipeline, add_model_arguments, image_files_or_exit, one_or_many, output_or_exit, pair,
                     pipeline_from_args, run_on_images)
from .segment import image_tensor

__all__ = ["DetectionPipeline", "draw_detections", "mask_to_rle", "predict_main"]


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO's uncompressed RLE of a binary HxW mask: run lengths in column-major order, starting with zeros
    (``pycocotools.mask.frPyObjects(rle, h, w)`` reads it)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


def draw_detections(image: Image.Image, output: Dict[str, torch.Tensor], classes: Sequence[str],
                    threshold: float = 0.5) -> Image.Image:
    """Masks blended in, boxes outlined and labelled with class and score (``output``: torchvision's dict)."""
    canvas = np.asarray(image, dtype=np.float32).copy()
    palette = np.random.default_rng(7).integers(60, 256, (len(classes) + 1, 3))
    keep = output["scores"] >= threshold
    masks = output["masks"][keep] if "masks" in output else []  # box-only detectors (DINO) have none
    for mask, label in zip(masks, output["labels"][keep]):
        region = mask[0].numpy() >= 0.5
        canvas[region] = canvas[region] * 0.5 + palette[int(label)] * 0.5
    drawn = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(drawn)
    for box, label, score in zip(output["boxes"][keep].tolist(), output["labels"][keep].tolist(),
                                 output["scores"][keep].tolist()):
        colour = tuple(int(c) for c in palette[label])
        draw.rectangle(box, outline=colour, width=2)
        draw.text((box[0] + 2, box[1] + 1), f"{classes[label - 1]} {score:.2f}", fill=colour)
    return drawn


class DetectionPipeline(Pipeline):
    """``pipeline(image, threshold=0.5, masks=False) -> {"width", "height", "objects": [{"label", "index",
    "score", "box" (x1, y1, x2, y2 in pixels), "mask" (COCO RLE, with masks=True)}]}``, best first.

    The model resizes as the protocol says (``test_size`` may be overridden) and returns boxes and masks at the
    image's own size.
    """

    task = "detect"
    bfloat16 = False  # torchvision's RoI heads and NMS run in float32
    expects = "a detector (Mask R-CNN, Cascade Mask R-CNN or DINO)"
    protocol: DetectionProtocol

    def __init__(self, model: nn.Module, source: Optional[str] = None, **protocol: Any):
        super().__init__(model, source, **protocol)
        transform = self.model.transform
        transform.max_size, transform.min_size = max(self.protocol.test_size), (min(self.protocol.test_size),)
        transform.size_divisible = self.protocol.size_divisor
        transform.image_mean, transform.image_std = list(self.protocol.mean), list(self.protocol.std)

    @classmethod
    def model_types(cls) -> Tuple[type, ...]:
        from ..models.dino import InternImageDINO
        from ..models.mask_rcnn import InternImageMaskRCNN
        return (InternImageMaskRCNN, InternImageDINO)

    @torch.inference_mode()
    def raw(self, images: Sequence[torch.Tensor], threshold: float = 0.0) -> List[Dict[str, torch.Tensor]]:
        """torchvision's per-image output dicts (on the CPU) for (3, H, W) [0, 1] images, with the detections scoring
        at least ``threshold``; their masks are (K, 1, H, W) bool at the image size (mmdet's ``>= 0.5``), pasted one
        at a time so that a large image holds one float mask, not one per detection."""
        self.model.eval()
        with unpasted_masks():  # the model called directly (an evaluation) still pastes every mask
            found = self.model([i.to(self.device) for i in images])
        outputs = []
        for image, out in zip(images, found):
            keep = out["scores"] >= threshold
            out = {k: v[keep] for k, v in out.items()}
            if "masks" in out:  # pasted where the model runs, one at a time
                height, width = image.shape[-2:]
                pasted = [(paste_masks(mask[None], box[None], height, width)[0] >= 0.5).cpu()
                          for mask, box in zip(out["masks"], out["boxes"])]
                out["masks"] = torch.stack(pasted) if pasted else torch.zeros(0, 1, height, width, dtype=torch.bool)
            outputs.append({k: v.cpu() for k, v in out.items()})
        return outputs

    def objects(self, output: Dict[str, torch.Tensor], threshold: float = 0.5,
                masks: bool = False) -> List[Dict[str, Any]]:
        """The detections of one raw output scoring at least ``threshold``, in the documented format."""
        found = []
        for i in (output["scores"] >= threshold).nonzero().flatten().tolist():
            index = int(output["labels"][i]) - 1
            entry = {"label": self.labels[index], "index": index, "score": round(float(output["scores"][i]), 4),
                     "box": [round(v, 1) for v in output["boxes"][i].tolist()]}
            if masks and "masks" in output:
                entry["mask"] = mask_to_rle(output["masks"][i, 0].numpy() >= 0.5)  # float (torchvision's) or bool
            found.append(entry)
        return found

    @one_or_many
    def __call__(self, image: Union[Image.Image, str], threshold: float = 0.5, masks: bool = False) -> Dict[str, Any]:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold {threshold!r}: expected a score in [0, 1]")  # NaN and 2 used to find nothing
        image = load_image(image)
        (output,) = self.raw([image_tensor(image)], threshold)
        return {"width": image.width, "height": image.height, "objects": self.objects(output, threshold, masks),
                "output": output}

    def draw(self, image: Image.Image, output: Dict[str, torch.Tensor], threshold: float = 0.5) -> Image.Image:
        return draw_detections(image, output, self.labels, threshold)


def predict_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 predict", description="Detect and segment objects in images.")
    parser.add_argument("images", nargs="+", help="image files or folders of them")
    add_model_arguments(parser)
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold for drawing and JSON")
    parser.add_argument("--test-size", type=pair, metavar="LONG,SHORT",
                        help="keep-ratio resize bound (default: the weights' protocol, 1333,800)")
    parser.add_argument("--masks", action="store_true", help="include each object's mask (COCO RLE) in the JSON")
    parser.add_argument("--out", default="predictions", help="folder for <name>_det.png drawings")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold {args.threshold}: expected a score in [0, 1]")
    files = image_files_or_exit(parser, args.images)
    out = output_or_exit(parser, args.out, "--out", folder=True)
    pipeline = pipeline_from_args(parser, args, DetectionPipeline, test_size=args.test_size)

    def run(file: str, image: Image.Image) -> Dict[str, Any]:
        result = pipeline(image, args.threshold, args.masks)
        drawing = out / f"{Path(file).stem}_det.png"
        pipeline.draw(image, result.pop("output"), args.threshold).save(drawing)
        return {"drawing": str(drawing), **result}
    results, failed = run_on_images(files, out, run, "{stem}_det.png")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['file']}: {len(r['objects'])} objects -> {r['drawing']}")
    return 1 if failed else 0
