"""Large images: segmentation resizes its logits in bands of rows and detection pastes only the masks it keeps, and
both give the numbers of the whole-image computation they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import intern2
from intern2.pipelines.detect import DetectionPipeline
from intern2.pipelines.segment import _view_logits, segment_labels, segment_probabilities
from intern2.weights import SegmentationProtocol

BACKBONE = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)


@pytest.fixture(scope="module")
def segmentor():
    torch.manual_seed(0)
    return intern2.create_model("upernet_internimage_t", num_classes=5, backbone=BACKBONE, channels=16,
                                aux_channels=16).eval()


def _whole_image(model, image, protocol, views):
    """The computation the bands replace: each view's logits resized to the whole image, softmax, averaged."""
    total = 0
    for ratio, flip in views:
        logits = _view_logits(model, image, protocol, ratio, flip)
        probs = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False).softmax(1)[0]
        total = total + (probs.flip(-1) if flip else probs)
    return total / len(views)


# The model sees (64, 96) for these sizes at test_size (96, 64): the image is smaller (logits shrink) or larger
# (logits grow) than that, by whole and fractional factors.
@pytest.mark.parametrize("size", [(41, 67), (64, 96), (150, 230)])
def test_banded_segmentation_equals_the_whole_image_resize(segmentor, size):
    protocol = SegmentationProtocol(test_size=(96, 64), tta_ratios=(0.75, 1.0), tta_flip=True)
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    one_row = 4 * 5 * size[1]  # band_bytes for bands of a single row
    reference = _whole_image(segmentor, image, protocol, [(1.0, False)])
    for band_bytes in (one_row, 7 * one_row, 1 << 30):
        probs = segment_probabilities(segmentor, image, protocol, band_bytes=band_bytes)
        assert probs.shape == (5, *size)
        torch.testing.assert_close(probs, reference, atol=1e-6, rtol=0)
        labels = segment_labels(segmentor, image, protocol, band_bytes=band_bytes)
        assert labels.dtype == torch.int64 and labels.shape == size
        top2 = reference.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-5  # a near-tie may break either way at the last bit
        assert clear.float().mean() > 0.9 and torch.equal(labels[clear], reference.argmax(0)[clear])
    tta = _whole_image(segmentor, image, protocol, [(0.75, False), (0.75, True), (1.0, False), (1.0, True)])
    torch.testing.assert_close(segment_probabilities(segmentor, image, protocol, tta=True, band_bytes=one_row), tta,
                               atol=1e-6, rtol=0)


def test_detection_pastes_only_the_kept_masks_and_the_same_ones():
    torch.manual_seed(0)
    model = intern2.create_model("mask_rcnn_internimage_t", backbone=BACKBONE, num_classes=2, min_size=64,
                                 max_size=96, fpn_channels=32, box_detections_per_img=20, box_score_thresh=0.0).eval()
    image = torch.rand(3, 90, 130, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        (everything,) = model([image])  # the model's own postprocess: every detection's mask pasted
    assert len(everything["scores"]) > 4 and everything["masks"].shape[-2:] == (90, 130)
    threshold = float(everything["scores"].median())
    pipeline = DetectionPipeline(model, test_size=(96, 64))
    (kept,) = pipeline.raw([image], threshold)
    selected = everything["scores"] >= threshold
    assert 0 < len(kept["scores"]) == int(selected.sum()) < len(everything["scores"])
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(kept[key], everything[key][selected])
    assert kept["masks"].dtype == torch.bool and kept["masks"].shape == (len(kept["scores"]), 1, 90, 130)
    assert torch.equal(kept["masks"], everything["masks"][selected] >= 0.5)
    (nothing,) = pipeline.raw([image], 1.0 + 1e-6)
    assert nothing["masks"].shape == (0, 1, 90, 130)
    # The pipeline's objects read the kept masks as they read the model's.
    assert pipeline.objects(kept, threshold, masks=True) == pipeline.objects(everything, threshold, masks=True)
    with torch.inference_mode():  # and the model itself still pastes every mask (`intern2 eval` calls it so)
        (again,) = model([image])
    assert torch.equal(again["masks"], everything["masks"])
