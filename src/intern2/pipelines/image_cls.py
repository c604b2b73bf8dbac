"""Image classification: an image in, the top-k class names with their indices and probabilities out."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from ..data.images import eval_transform, load_image
from ..weights import ImageClassificationProtocol
from .common import (Pipeline, add_model_arguments, check_aspect, image_files_or_exit, items, one_or_many,
                     pipeline_from_args, positive, print_topk, progress, top_k)

__all__ = ["ImageClassificationPipeline", "predict_main"]


class ImageClassificationPipeline(Pipeline):
    """``pipeline(image, topk=5) -> {"top": [{"label", "index", "prob"}]}`` with the weights' preprocessing
    (timm's: resize to ``input_size / crop_pct`` as ``crop_mode`` says, centre crop, normalise)."""

    task = "image-cls"
    expects = "an image classifier (InternImage with a head)"
    protocol: ImageClassificationProtocol

    @classmethod
    def model_types(cls) -> Tuple[type, ...]:
        from ..models.internimage import InternImage
        return (InternImage,)

    @classmethod
    def check_model(cls, model: Any) -> None:
        super().check_model(model)
        if getattr(model, "features_only", False):
            raise TypeError(f"{cls.__name__}: expected {cls.expects}, got a features_only backbone (no classifier)")
        if getattr(model, "num_classes", None) == 0:  # timm's num_classes=0: forward returns pooled features
            raise TypeError(f"{cls.__name__}: expected {cls.expects}, got a model without a classifier "
                            f"(num_classes=0; its forward gives pooled features)")
        if getattr(model, "in_chans", 3) not in (1, 3):
            raise TypeError(f"{cls.__name__}: images are RGB or grey; this model takes {model.in_chans} channels")

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The official eval preprocessing; for a model built with ``in_chans=1`` (its stem adapted from RGB), the
        grey image normalised by the RGB statistics' means."""
        p = self.protocol
        if getattr(self.model, "in_chans", 3) == 1:
            grey = eval_transform(p.img_size, [sum(p.mean) / len(p.mean)], [sum(p.std) / len(p.std)], p.crop_pct,
                                  p.interpolation, p.crop_mode)
            return lambda image: grey(image.convert("L"))
        return eval_transform(p.img_size, p.mean, p.std, p.crop_pct, p.interpolation, p.crop_mode)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) preprocessed images -> (N, num_classes) float32 class probabilities."""
        return self.model(images.to(self.device, self.dtype)).float().softmax(-1).cpu()

    @one_or_many
    def __call__(self, image: Union[Image.Image, str], topk: int = 5) -> Dict[str, Any]:
        image = load_image(image)
        check_aspect(*image.size)
        return {"top": top_k(self.probabilities(self.transform(image)[None])[0], self.labels, topk)}

    def predict_files(self, files: Sequence[str], topk: int = 5) -> List[Dict[str, Any]]:
        """``{"file", "top"}`` per file; an unreadable file gets ``{"file", "error"}`` naming it."""
        results = []
        for file in progress(items(files, "files"), "images"):
            try:
                results.append({"file": file, **self(load_image(file), topk)})
            except ValueError as exc:  # unreadable, or beyond the preprocessing
                results.append({"file": file, "error": f"{file}: {exc}" if file not in str(exc) else str(exc)})
        return results


def predict_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 predict", description="Classify images.")
    parser.add_argument("images", nargs="+", help="image files or folders of them")
    add_model_arguments(parser)
    parser.add_argument("--topk", type=positive(int), default=5, help="labels per image, best first (5)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    files = image_files_or_exit(parser, args.images)
    pipeline = pipeline_from_args(parser, args, ImageClassificationPipeline)
    return print_topk(pipeline.predict_files(files, args.topk), args.json)
