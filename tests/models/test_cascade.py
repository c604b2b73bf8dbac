"""Cascade Mask R-CNN: equal to the official mmdet CascadeRoIHead (golden fixture, float64), the official full-size
checkpoint layout both ways, training losses."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

import intern2
from intern2.heads.detection import mmdet_to_torchvision, paste_masks, torchvision_to_mmdet

from conftest import FIXTURES, load_fixture

FIXTURE = "dense-heads/cascade"
pytestmark = pytest.mark.skipif(not (FIXTURES / f"{FIXTURE}.safetensors").exists(), reason="fixture not present")
TINY_BACKBONE = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)


def _mmdet_columns(logits: torch.Tensor, deltas: torch.Tensor):
    """Our (background first, (K+1)x4 deltas) -> mmdet's (background last, Kx4)."""
    return torch.cat([logits[:, 1:], logits[:, :1]], 1), deltas[:, 4:]


@pytest.fixture(scope="module")
def official():
    """The fixture's reduced head loaded through the converter into a float64 Cascade Mask R-CNN."""
    meta, tensors = load_fixture(FIXTURE)
    p, test_cfg = meta["params"], meta["reduced_roi_head_cfg"]["test_cfg"]
    model = intern2.create_model("cascade_mask_rcnn_internimage_l", backbone=TINY_BACKBONE, num_classes=8,
                                 fpn_channels=p["C"], box_fc_channels=p["fc"], mask_channels=p["mconv"],
                                 box_score_thresh=test_cfg["score_thr"],
                                 box_nms_thresh=test_cfg["nms"]["iou_threshold"],
                                 box_detections_per_img=test_cfg["max_per_img"])
    state = {f"roi_head.{k[len('state.'):]}": v for k, v in tensors.items() if k.startswith("state.")}
    heads = {k[len("roi_heads."):]: v for k, v in mmdet_to_torchvision(state).items()}
    model.roi_heads.double().load_state_dict(heads, strict=True)
    model.eval()
    features = OrderedDict((name, tensors[f"input.fpn{i}"]) for i, name in enumerate(["0", "1", "2", "3", "pool"]))
    proposals = [tensors["input.proposals0"][:, :4], tensors["input.proposals1"][:, :4]]
    shapes = [tuple(m["img_shape"][:2]) for m in meta["img_metas"]]
    originals = [tuple(m["ori_shape"][:2]) for m in meta["img_metas"]]
    return model, tensors, features, proposals, shapes, originals


def _rois(rois: torch.Tensor):
    return [rois[rois[:, 0] == b, 1:] for b in range(2)]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_each_stage_and_its_refinement_equal_the_official_head(official, stage):
    model, t, features, _, shapes, _ = official
    boxes = _rois(t[f"test.stage{stage}.rois"])
    with torch.no_grad():
        logits, deltas = model.roi_heads.stage(stage, features, boxes, shapes)
    got_logits, got_deltas = _mmdet_columns(logits, deltas)
    torch.testing.assert_close(got_logits, t[f"test.stage{stage}.cls_score"], atol=1e-9, rtol=0)
    torch.testing.assert_close(got_deltas, t[f"test.stage{stage}.bbox_pred"], atol=1e-9, rtol=0)
    if stage < 2:  # the next stage's RoIs: regressed with the best non-background class
        moved = model.roi_heads.regress(stage, boxes, deltas, logits[:, 1:].argmax(1) + 1, shapes)
        torch.testing.assert_close(torch.cat(moved), t[f"test.stage{stage + 1}.rois"][:, 1:], atol=1e-9, rtol=0)


def test_detections_and_masks_equal_the_official_simple_test(official):
    """roi_heads + the transform's postprocess (rescale, mmdet mask pasting) = ``roi_head.simple_test(rescale=True)``:
    boxes, scores, labels, the stage-averaged mask probabilities and every pixel of the binary masks."""
    model, t, features, proposals, shapes, originals = official
    with torch.no_grad():
        detections, _ = model.roi_heads(features, proposals, shapes)
        merged = [d["masks"].clone() for d in detections]
        results = model.transform.postprocess(detections, shapes, originals)
    for b, result in enumerate(results):
        want = t[f"test.img{b}.det_bboxes"]
        torch.testing.assert_close(result["boxes"], want[:, :4], atol=1e-9, rtol=0)
        torch.testing.assert_close(result["scores"], want[:, 4], atol=1e-9, rtol=0)
        assert (result["labels"] - 1).tolist() == t[f"test.img{b}.det_labels"].tolist()
        torch.testing.assert_close(merged[b][:, 0], t[f"test.img{b}.merged_mask_prob_of_label"], atol=1e-9, rtol=0)
        binary = (result["masks"][:, 0] >= 0.5).to(torch.uint8)
        assert binary.shape == t[f"test.img{b}.masks"].shape
        assert int((binary != t[f"test.img{b}.masks"]).sum()) == 0


def test_each_stage_mask_head_equals_the_official_one(official):
    model, t, features, _, shapes, _ = official
    heads = model.roi_heads
    with torch.no_grad():
        pooled = heads.mask_roi_pool(features, _rois(t["test.mask_rois"]), shapes)
        labels = torch.cat([t["test.img0.det_labels"], t["test.img1.det_labels"]]) + 1
        for stage in range(3):
            logits = heads.mask_predictors[stage](heads.mask_heads[stage](pooled))
            torch.testing.assert_close(logits[torch.arange(len(labels)), labels],
                                       t[f"test.mask_stage{stage}.mask_logits_of_label"], atol=1e-9, rtol=0)
            if stage == 0:
                torch.testing.assert_close(logits[:2, 1:], t["test.mask_stage0.mask_logits_all_classes_first2"],
                                           atol=1e-9, rtol=0)


def test_mask_pasting_matches_grid_sample():
    """The separable paste equals mmdet's grid_sample formulation inside its paste region, 0 outside."""
    masks = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    boxes = torch.tensor([[3.2, 4.7, 40.1, 30.9], [0.0, 0.0, 64.0, 48.0], [50.5, 20.2, 52.0, 47.0]],
                         dtype=torch.float64)
    got = paste_masks(masks, boxes, 48, 64)
    ys, xs = torch.arange(48, dtype=torch.float64) + 0.5, torch.arange(64, dtype=torch.float64) + 0.5
    for n, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        gx = ((xs - x0) / (x1 - x0) * 2 - 1).expand(48, -1)
        gy = ((ys - y0) / (y1 - y0) * 2 - 1)[:, None].expand(-1, 64)
        want = torch.nn.functional.grid_sample(masks[n:n + 1], torch.stack([gx, gy], -1)[None], align_corners=False)
        region = torch.zeros(48, 64, dtype=torch.bool)
        region[max(int(y0) - 1, 0):min(int(-(-y1 // 1)) + 1, 48), max(int(x0) - 1, 0):min(int(-(-x1 // 1)) + 1, 64)] = 1
        torch.testing.assert_close(got[n, 0], want[0, 0] * region, atol=1e-12, rtol=0)


def test_official_full_size_layout_both_ways():
    """The published Cascade-L checkpoint's 979 tensors (names, shapes, dtypes) are exactly what our model writes,
    and they load back strictly."""
    listing = json.loads((FIXTURES / "dense-heads/cascade_l_full_keys.json").read_text())
    with torch.device("meta"):
        model = intern2.create_model("cascade_mask_rcnn_internimage_l")
    written = torchvision_to_mmdet(model.state_dict())
    assert {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in written.items()} == \
        {k: [shape, dtype] for k, shape, dtype in listing["keys"]}
    assert sum(v.numel() for v in written.values()) == listing["num_params"]
    official = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                for k, shape, dtype in listing["keys"]}
    converted = mmdet_to_torchvision(official)
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)


def test_checkpoint_round_trip_and_training(tmp_path):
    """An mmdet-layout file of a small cascade loads with every key; the loss dict has every stage's losses and
    every parameter gets a gradient."""
    kwargs = dict(backbone=TINY_BACKBONE, num_classes=3, min_size=64, max_size=96, fpn_channels=16,
                  box_fc_channels=32, mask_channels=16)
    torch.manual_seed(0)
    source = intern2.create_model("cascade_mask_rcnn_internimage_xl", **kwargs, box_score_thresh=0.0).eval()
    torch.save({"state_dict": torchvision_to_mmdet(source.state_dict()), "meta": {}}, tmp_path / "cascade.pth")
    loaded = intern2.create_model("cascade_mask_rcnn_internimage_xl", checkpoint_path=tmp_path / "cascade.pth",
                                  **kwargs, box_score_thresh=0.0).eval()
    image = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        want, got = source(image)[0], loaded(image)[0]
    assert len(want["boxes"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)

    model = loaded.train()
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 10:30, 12:40], masks[1, 35:60, 30:55] = 1, 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0], [30.0, 35.0, 55.0, 60.0]]),
                "labels": torch.tensor([1, 3]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)}]
    losses = model([torch.rand(3, 64, 80), torch.rand(3, 64, 80)], targets)
    assert set(losses) == {f"s{s}.{name}" for s in range(3) for name in ("loss_classifier", "loss_box_reg",
                                                                         "loss_mask")} | {"loss_objectness",
                                                                                          "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["s2.loss_box_reg"].item() > 0
    sum(losses.values()).backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad, without_grad[:5]


def test_sync_batchnorm_keeps_the_layout_and_the_answer():
    """Under torchrun on GPUs the trainer gives the box heads SyncBatchNorm (the official SyncBN); the state-dict
    layout and the eval-mode answer are those of plain BatchNorm (CPU runs keep BatchNorm: SyncBN needs CUDA)."""
    torch.manual_seed(0)
    model = intern2.create_model("cascade_mask_rcnn_internimage_l", backbone=TINY_BACKBONE, num_classes=3,
                                 min_size=64, max_size=96, fpn_channels=16, box_fc_channels=32, mask_channels=16,
                                 box_score_thresh=0.0).eval()
    image = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(2))]
    keys = list(model.state_dict())
    with torch.no_grad():
        want = model(image)[0]
        model.sync_batchnorm()
        got = model(image)[0]
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.roi_heads.box_heads.modules()) == 12
    torch.testing.assert_close(got["scores"], want["scores"], atol=0, rtol=0)
