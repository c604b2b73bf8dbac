"""Detection end to end: COCO data (polygons, RLE, malformed input), train/eval/predict/convert CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from intern2 import cli
from intern2.data.coco import CocoDetection, decode_segmentation, open_coco_source
from intern2.data.shapes import generate_shapes

pytest.importorskip("pycocotools")
TINY = ("model_args={backbone: {channels: 16, depths: [1, 1, 1, 1], groups: [1, 2, 4, 8], drop_path_rate: 0.0}, "
        "fpn_channels: 32, box_fc_channels: 64, mask_channels: 16, box_batch_size_per_image: 32, "
        "rpn_post_nms_top_n_train: 100, rpn_pre_nms_top_n_train: 200}")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=6, num_val=3, size=32)


def _coco_folder(root, annotations, images=({"id": 1, "file_name": "a.png", "height": 20, "width": 30},)):
    (root / "images" / "train").mkdir(parents=True)
    for entry in images:
        Image.new("RGB", (entry["width"], entry["height"])).save(root / "images" / "train" / entry["file_name"])
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "box"}]
    (root / "instances_train.json").write_text(json.dumps({"images": list(images), "annotations": annotations,
                                                           "categories": categories}))
    return root


def test_polygons_rle_and_degenerate_boxes(tmp_path, caplog):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 5, 40, 10], "iscrowd": 0},  # clipped to the image
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "iscrowd": 0},  # empty: skipped
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [40, 30, 5, 5], "iscrowd": 0},  # outside: skipped
    ]
    source = open_coco_source(str(_coco_folder(tmp_path, annotations)), "train")
    assert source.skipped_annotations == 2 and "skipped 2" in caplog.text
    assert source.classes == ["box", "cat"] and source.category_ids == [3, 7]
    sample = CocoDetection(source, train=False)[0]
    target = sample["target"]
    assert target["labels"].tolist() == [2, 1]
    assert target["boxes"][1].tolist() == [20.0, 5.0, 30.0, 15.0]
    assert target["masks"].shape == (2, 20, 30) and target["masks"][0].sum() > 60
    assert target["masks"][1, 5:15, 20:30].all()  # no segmentation: the box is the mask
    rle = {"size": [4, 4], "counts": [2, 3, 11]}  # uncompressed RLE
    assert decode_segmentation(rle, 4, 4).sum() == 3


def test_flip_keeps_boxes_on_masks(shapes):
    dataset = CocoDetection(open_coco_source(str(shapes), "train"), train=True, hflip=1.0)
    sample = dataset[0]
    for box, mask in zip(sample["target"]["boxes"], sample["target"]["masks"]):
        ys, xs = np.nonzero(mask.numpy())
        assert abs(xs.min() - box[0].item()) <= 1 and abs(xs.max() + 1 - box[2].item()) <= 1


@pytest.mark.parametrize("content,message", [("{not json", "not a readable COCO JSON"),
                                             ('{"images": [], "annotations": {}}', "expected a list under")])
def test_malformed_annotation_files(tmp_path, content, message):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "instances_train.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        open_coco_source(str(tmp_path), "train")


def test_missing_image_file_is_named(tmp_path):
    root = _coco_folder(tmp_path, [])
    (root / "images" / "train" / "a.png").unlink()
    with pytest.raises(ValueError, match="a.png is missing"):
        open_coco_source(str(root), "train")


def test_autoaugment_crops_keep_boxes_on_masks(shapes):
    """The 3x recipe's AutoAugment: about half the samples resized and cropped (lengths scaled by min_size / 800),
    boxes inside the crop and on their masks, reproducible per (seed, epoch, index), new crops each epoch."""
    source = open_coco_source(str(shapes), "train")
    dataset = CocoDetection(source, train=True, hflip=0.5, seed=3, augment="autoaugment", test_size=(400, 667))
    sizes = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            image, target = sample["image"], sample["target"]
            height, width = image.shape[1:]
            sizes.add((epoch, index, height, width))
            assert target["masks"].shape == (len(target["boxes"]), height, width)
            assert len(target["labels"]) == len(target["boxes"])
            boxes = target["boxes"]
            assert ((boxes[:, 0::2] >= 0) & (boxes[:, 0::2] <= width) & (boxes[:, 1::2] >= 0) &
                    (boxes[:, 1::2] <= height)).all()
            assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
            for box, mask in zip(boxes, target["masks"]):
                ys, xs = np.nonzero(mask.numpy())
                if len(xs):  # an object cut by the crop keeps the part inside it
                    assert xs.min() >= box[0].item() - 1 and xs.max() + 1 <= box[2].item() + 1
    cropped = {(e, i) for e, i, h, w in sizes if (h, w) != (32, 32)}
    assert 0 < len(cropped) < len(sizes)  # policy (b) some of the time: short side 200 / 250 / 300, crop 192..300
    assert all(192 <= h <= 300 and 192 <= w <= 300 for e, i, h, w in sizes if (e, i) in cropped)
    dataset.set_epoch(1)
    again = dataset[2]
    dataset.set_epoch(1)
    torch.testing.assert_close(dataset[2]["image"], again["image"])
    with pytest.raises(ValueError, match="augment 'mosaic'"):
        CocoDetection(source, train=True, augment="mosaic")


TINY_DINO = ("model_args={backbone: {channels: 16, depths: [1, 1, 1, 1], groups: [1, 2, 4, 8], drop_path_rate: 0.0}, "
             "embed_dims: 32, num_query: 20, num_feats: 16, neck_groups: 8, num_encoder_layers: 1, "
             "num_decoder_layers: 2, feedforward_channels: 64, num_dn_queries: 6}")


@pytest.mark.parametrize("architecture,augment", [("mask_rcnn_internimage_t", "none"),
                                                  ("cascade_mask_rcnn_internimage_l", "autoaugment"),
                                                  ("dino_4scale_internimage_t", "autoaugment")])
def test_train_eval_predict_convert(shapes, tmp_path, capsys, architecture, augment):
    out = tmp_path / "run"
    dino = architecture.startswith("dino_")
    assert cli.main(["train", "detect", "--data", str(shapes), "--out", str(out), "--model", architecture,
                     "--set", f"augment={augment}", "--set", TINY_DINO if dino else TINY,
                     "--set", "min_size=64", "--set", "max_size=64", "--set", "train.max_steps=2",
                     "--set", "train.batch_size=2", "--set", "train.device=cpu", "--set", "train.lr=1e-4"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"bbox_AP", "bbox_AP50"} <= set(final) and final["images"] == 3
    assert final["bbox_APm"] is None and final["bbox_APl"] is None  # 32x32 images: no object of those sizes
    assert ("segm_AP" in final) != dino  # box-only detectors get no (box-shaped) mask AP
    assert cli.main(["eval", "--data", str(shapes), "--checkpoint", str(out / "model"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    image = shapes / "images" / "val" / "000000.png"
    assert cli.main(["predict", str(image), "--checkpoint", str(out / "model"), "--out", str(tmp_path / "pred"),
                     "--threshold", "0.0", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert Image.open(result["drawing"]).size == (32, 32)
    assert all(o["label"] in ("circle", "square", "triangle", "star", "ring") for o in result["objects"])
    # An official-layout (mmdet) file converts into a model folder that reproduces the model.
    from intern2 import from_pretrained
    from intern2.heads.detection import torchvision_to_mmdet
    model = from_pretrained(out / "model").eval()
    state = model.state_dict() if dino else torchvision_to_mmdet(model.state_dict())  # DINO's names are mmdet's
    torch.save({"state_dict": state}, tmp_path / "official.pth")
    config = json.loads((out / "model" / "config.json").read_text())
    head = ["embed_dims", "num_query", "num_feats", "neck_groups", "num_encoder_layers", "num_decoder_layers",
            "feedforward_channels"] if dino else ["fpn_channels", "box_fc_channels", "mask_channels"]
    overrides = ["--set", f"num_classes={config['num_classes']}", "--set", "min_size=64", "--set", "max_size=64",
                 "--set", f"backbone={json.dumps(config['backbone'])}",
                 *(arg for key in head for arg in ("--set", f"{key}={config[key]}"))]
    assert cli.main(["convert", "--model", architecture, "--checkpoint", str(tmp_path / "official.pth"),
                     "--out", str(tmp_path / "converted"), *overrides]) == 0
    converted = from_pretrained(tmp_path / "converted").eval()
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        for key in ("boxes", "scores"):
            torch.testing.assert_close(converted(images)[0][key], model(images)[0][key])


EXPORTED = {"mask_rcnn_internimage_t": dict(fpn_channels=32, box_fc_channels=64, mask_channels=16),
            "cascade_mask_rcnn_internimage_l": dict(fpn_channels=32, box_fc_channels=64, mask_channels=16),
            "dino_4scale_internimage_t": dict(embed_dims=32, num_query=20, max_per_img=10, num_feats=16, neck_groups=8,
                                              num_encoder_layers=1, num_decoder_layers=2, feedforward_channels=64)}


@pytest.mark.parametrize("architecture", list(EXPORTED))
def test_onnx_export_matches_pytorch_on_the_shapes_images(shapes, tmp_path, capsys, architecture):
    """`intern2 export onnx` of a Mask R-CNN / Cascade Mask R-CNN / DINO (fixed size, post-processing in the graph):
    onnxruntime finds the same objects as PyTorch on the built-in shapes images, boxes and scores within 1e-4 (and
    the same masks for the models that have them)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    import intern2
    torch.manual_seed(0)
    model = intern2.create_model(architecture, num_classes=5, min_size=64, max_size=64,
                                 backbone=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8]),
                                 **EXPORTED[architecture]).eval()  # the preset's drop path: identity in eval
    intern2.save_pretrained(model, tmp_path / "det")
    out = tmp_path / "det.onnx"
    assert cli.main(["export", "onnx", "--checkpoint", str(tmp_path / "det"), "--out", str(out),
                     "--image-size", "32,32"]) == 0
    names = ["boxes", "labels", "scores"] + ([] if architecture.startswith("dino_") else ["masks"])
    assert f"outputs {', '.join(names)}" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for path in sorted((shapes / "images" / "val").glob("*.png")):
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        got = dict(zip(names, session.run(None, {"image": image.contiguous().numpy()})))
        with torch.no_grad():
            want = model([image])[0]
        assert len(got["boxes"]) == len(want["boxes"]) > 0 and (got["labels"] == want["labels"].numpy()).all()
        np.testing.assert_allclose(got["boxes"], want["boxes"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["scores"], want["scores"].numpy(), rtol=0, atol=1e-4)
        if "masks" in got:
            np.testing.assert_allclose(got["masks"], want["masks"].numpy(), rtol=0, atol=1e-3)


def test_export_check_matches_detections_whose_scores_tie():
    """Near-tied detections may leave NMS in either order: the export check matches rows (label, score, box), and
    still refuses detections it cannot pair one to one."""
    from intern2.export import _matched_order
    want = {"boxes": torch.tensor([[0., 0., 10., 10.], [50., 50., 90., 90.], [5., 5., 20., 20.]]),
            "scores": torch.tensor([0.5, 0.5, 0.4]), "labels": torch.tensor([1, 1, 2])}
    swapped = {k: v[[1, 0, 2]] for k, v in want.items()}
    swapped["boxes"] = swapped["boxes"] + 0.01
    order = _matched_order(swapped, want, atol=1e-4)
    assert order.tolist() == [1, 0, 2]
    torch.testing.assert_close(swapped["boxes"][order], want["boxes"] + 0.01)
    relabelled = dict(swapped, labels=torch.tensor([1, 1, 3]))
    assert _matched_order(relabelled, want, atol=1e-4) is None  # no detection of label 2 to pair with
    duplicated = dict(want, boxes=want["boxes"][[0, 0, 2]])
    assert _matched_order(duplicated, want, atol=1e-4) is None  # two of PyTorch's rows would take the same one
    empty = {k: v[:0] for k, v in want.items()}
    assert _matched_order(empty, empty, atol=1e-4).tolist() == []


def test_categories_must_match_and_training_needs_annotations(shapes, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    val = json.loads((data / "instances_val.json").read_text())
    val["categories"] = val["categories"][:-1]  # a class fewer: label k would be scored as another category
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != val["categories"][-1]["id"] + 1]
    (data / "instances_val.json").write_text(json.dumps(val))
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "detect", "--data", str(data), "--out", str(tmp_path / "run"), "--set", TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "instances_val.json: its 4 categories" in err and "instances_train.json" in err
    with pytest.raises(SystemExit):  # an official COCO detector (80 classes, random here) on the shapes' 5
        cli.main(["eval", "--data", str(shapes), "--model", "mask_rcnn_internimage_t"])
    assert "differ from the 80 of the model mask_rcnn_internimage_t" in capsys.readouterr().err
    train = json.loads((data / "instances_train.json").read_text())
    (data / "instances_train.json").write_text(json.dumps({**train, "annotations": []}))
    with pytest.raises(SystemExit):
        cli.main(["train", "detect", "--data", str(data), "--out", str(tmp_path / "run"), "--set", TINY])
    assert "instances_train.json: no usable annotation to train on" in capsys.readouterr().err


def test_no_detections_score_as_pycocotools_scores_useless_ones(shapes, tmp_path, capsys):
    """No detection at all gives what COCOeval gives a detection that matches nothing: 0 where ground truth exists,
    None for the object sizes absent from the data (32 px shapes: no medium or large object); a split without any
    annotation is refused by name, not scored None and then printed with a TypeError."""
    from intern2.tasks.detect import coco_evaluate
    source = open_coco_source(str(shapes), "val")
    useless = [{"image_id": source.images[0]["id"], "category_id": source.category_ids[0], "score": 0.01,
                "bbox": [0.0, 0.0, 1.0, 1.0]}]
    expected = coco_evaluate(source, useless, masks=False)
    assert expected["bbox_AP"] == 0.0 and expected["bbox_APm"] is None and expected["bbox_APl"] is None
    assert coco_evaluate(source, [], masks=False) == expected
    assert coco_evaluate(source, []) == {**expected, **{k.replace("bbox", "segm"): v for k, v in expected.items()}}
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    val = json.loads((data / "instances_val.json").read_text())
    (data / "instances_val.json").write_text(json.dumps({**val, "annotations": []}))
    import intern2
    model = intern2.create_model("mask_rcnn_internimage_t", num_classes=len(source.classes), fpn_channels=32,
                                 backbone=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8]))
    model.pretrained_cfg["label_names"] = source.classes
    intern2.save_pretrained(model, tmp_path / "detector")
    for argv in (["eval", "--data", str(data), "--checkpoint", str(tmp_path / "detector")],
                 ["train", "detect", "--data", str(data), "--out", str(tmp_path / "run"), "--set", TINY]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            "instances_val.json: no usable annotation to evaluate against")
