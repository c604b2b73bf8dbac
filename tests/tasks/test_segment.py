"""Semantic segmentation end to end: built-in shapes data, metrics, train/eval/predict through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from intern2 import cli
from intern2.data.segmentation import SegmentationDataset, open_seg_source
from intern2.data.shapes import SHAPE_CLASSES, generate_shapes
from intern2.tasks.segment import SegmentationMetrics

pytest.importorskip("pycocotools")
TINY = ("model_args={backbone: {channels: 16, depths: [1, 1, 1, 1], groups: [1, 2, 4, 8], drop_path_rate: 0.0}, "
        "channels: 16, aux_channels: 16}")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, size=32)


def test_generated_shapes_are_consistent(shapes):
    from pycocotools import mask as mask_utils
    coco = json.loads((shapes / "instances_val.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
    assert (shapes / "classes.txt").read_text().split() == ["background", *SHAPE_CLASSES]
    for entry in coco["annotations"]:
        image = next(i for i in coco["images"] if i["id"] == entry["image_id"])
        semantic = np.asarray(Image.open(shapes / "annotations" / "val" / image["file_name"]))
        mask = mask_utils.decode({"size": entry["segmentation"]["size"],
                                  "counts": entry["segmentation"]["counts"].encode()}).astype(bool)
        assert mask.sum() == entry["area"] and (semantic[mask] == entry["category_id"]).all()
        x, y, w, h = entry["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 32 and y + h <= 32


def test_sources_and_errors(shapes, tmp_path):
    source = open_seg_source(str(shapes), "train")
    assert len(source.pairs) == 8 and source.classes[0] == "background"
    with pytest.raises(ValueError, match="no folder .*images/test"):
        open_seg_source(str(shapes), "test")
    broken = tmp_path / "broken"
    (broken / "images" / "train").mkdir(parents=True)
    (broken / "annotations" / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(broken / "images" / "train" / "a.png")
    with pytest.raises(ValueError, match="have no label map.*a.png"):
        open_seg_source(str(broken), "train")


def test_augmentation_is_seeded_and_aligned(shapes):
    source = open_seg_source(str(shapes), "train")
    dataset = SegmentationDataset(source, (0, 0, 0), (1, 1, 1), train=True, crop_size=24, scale=32)
    first, again = dataset[3], dataset[3]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert first["image"].shape == (3, 24, 24) and first["label"].shape == (24, 24)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3]["image"], first["image"])
    # Padding is ignore (255) in the label and 0 in the image, at the same pixels.
    padded = SegmentationDataset(source, (0, 0, 0), (1, 1, 1), train=True, crop_size=40, scale=32, ratio_range=(1, 1))
    sample = padded[0]
    ignored = sample["label"] == 255
    assert ignored.any() and (sample["image"][:, ignored] == 0).all()


def test_miou_metric():
    metrics = SegmentationMetrics(["bg", "a", "b"])
    confusion = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 0, 0]], dtype=torch.float64).flatten()
    result = metrics.summarize({"confusion": confusion, "skipped": torch.tensor(0.0)})
    iou_bg, iou_a = 8 / (8 + 2 + 1), 3 / (3 + 1 + 2)
    assert result["mIoU"] == pytest.approx((iou_bg + iou_a) / 2 * 100)  # class b absent everywhere: not counted
    assert result["aAcc"] == pytest.approx(11 / 14 * 100) and set(result["per_class_IoU"]) == {"bg", "a"}


TINY_M2F = ("model_args={backbone: {channels: 16, depths: [1, 1, 1, 1], groups: [1, 2, 4, 8], drop_path_rate: 0.0, "
            "level2_post_norm_block_ids: null}, feat_channels: 32, num_queries: 8, num_heads: 4, "
            "num_decoder_layers: 3, decoder_feedforward: 64, num_encoder_layers: 1, encoder_feedforward: 64, "
            "num_feats: 16, groups: 8, train_points: 256}")


@pytest.mark.parametrize("model", ["upernet_internimage_t", "mask2former_internimage_h"])
def test_train_eval_predict(shapes, tmp_path, capsys, model):
    out = tmp_path / "run"
    tiny = TINY_M2F if model.startswith("mask2former") else TINY
    assert cli.main(["train", "segment", "--data", str(shapes), "--out", str(out), "--model", model, "--set", tiny,
                     "--set", "crop_size=32", "--set", "scale=32", "--set", "test_size=[32, 32]",
                     "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.device=cpu"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= final["mIoU"] <= 100 and final["pixels"] == 4 * 32 * 32
    assert cli.main(["eval", "--data", str(shapes), "--checkpoint", str(out / "model"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pixels"] == 4 * 32 * 32
    image = shapes / "images" / "val" / "000000.png"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    code = cli.main(["predict", str(image), str(bad), "--checkpoint", str(out / "model"), "--out",
                     str(tmp_path / "pred"), "--json"])
    captured = capsys.readouterr()
    assert code == 1 and "bad.png: not a readable image" in captured.err
    (result,) = json.loads(captured.out)
    overlay = Image.open(result["overlay"])
    assert overlay.size == (32, 32) and abs(sum(c["fraction"] for c in result["classes"]) - 1) < 1e-3
    assert np.asarray(Image.open(result["mask"])).max() < 6
