"""Images as users pass them: paths, PIL images of any mode, arrays; and what is refused, with a reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import intern2
from intern2.data.images import load_image
from intern2.pipelines.image_cls import ImageClassificationPipeline

MODES = ("RGB", "RGBA", "LA", "CMYK", "L", "P", "1", "I", "I;16", "F")


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_becomes_rgb(mode):
    image = load_image(Image.new(mode, (5, 4)))
    assert image.mode == "RGB" and image.size == (5, 4)


def test_paths_and_arrays_read_as_rgb(tmp_path):
    Image.new("LA", (6, 3)).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB" and load_image(str(tmp_path / "grey.png")).size == (6, 3)
    assert load_image(np.zeros((3, 6), np.uint8)).size == (6, 3)
    assert load_image(np.zeros((3, 6, 3), np.uint8)).mode == "RGB"
    for channels in (1, 4):  # a grey array with its channel axis (PIL alone refused it), RGBA
        assert load_image(np.zeros((3, 6, channels), np.uint8)).size == (6, 3)


@pytest.mark.parametrize("bad, error, message", [
    (None, TypeError, "expected a file path, a PIL image or a uint8 array, got NoneType"),
    (torch.zeros(3, 4, 4), TypeError, "got Tensor"),
    (np.array(3, np.uint8), ValueError, r"expected an \(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\) uint8 array, "
                                        r"got uint8 \(\)"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, r"uint8 array, got uint8 \(4, 4, 2\)"),
    (np.zeros((4, 4), np.float64), ValueError, "uint8 array, got float64"),
    (Image.new("RGB", (0, 5)), ValueError, r"has no pixels \(0 x 5\)"),
])
def test_what_is_not_an_image_is_named(bad, error, message):
    with pytest.raises(error, match=message):
        load_image(bad)


def test_a_pipeline_takes_any_pil_mode():
    torch.manual_seed(0)
    model = intern2.create_model("internimage_t", num_classes=3, channels=16, depths=[1, 1, 1, 1],
                                 groups=[1, 2, 4, 8])
    model.pretrained_cfg["input_size"] = (3, 32, 32)
    pipeline = ImageClassificationPipeline(model)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 4), np.uint8), "RGBA")
    assert pipeline(rgb) == pipeline(rgb.convert("RGB"))  # what a path to that file gives
    with pytest.raises(TypeError, match="got int"):
        pipeline(5)
