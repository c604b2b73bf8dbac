"""Mask R-CNN on torchvision: the mmdet converter, mmdet-matching anchors and RoIAlign, training losses."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

import intern2
from intern2.heads.detection import (AlignedMultiScaleRoIAlign, UnroundedAnchorGenerator, mmdet_to_torchvision,
                                     torchvision_to_mmdet)

TINY = dict(backbone=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0),
            num_classes=3, min_size=64, max_size=96)


def _model(**extra):
    torch.manual_seed(0)
    model = intern2.create_model("mask_rcnn_internimage_t", **TINY, **extra).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_mmdet_checkpoint_round_trip(tmp_path):
    """A checkpoint written in the official mmdet layout converts back: every key used, outputs identical."""
    source = _model(box_score_thresh=0.0, rpn_post_nms_top_n_test=50)
    mmdet_state = torchvision_to_mmdet(source.state_dict())
    assert set(mmdet_state) >= {"neck.lateral_convs.0.conv.weight", "rpn_head.rpn_cls.weight",
                                "roi_head.bbox_head.shared_fcs.1.weight", "roi_head.mask_head.convs.3.conv.weight",
                                "roi_head.mask_head.upsample.weight", "backbone.levels.0.blocks.0.gamma1"}
    assert mmdet_state["roi_head.bbox_head.fc_cls.weight"].shape[0] == 4  # 3 classes + background last
    assert mmdet_state["roi_head.bbox_head.fc_reg.weight"].shape[0] == 12  # 3 x 4, no background
    assert mmdet_state["roi_head.mask_head.conv_logits.weight"].shape[0] == 3
    torch.save({"state_dict": mmdet_state, "meta": {"mmdet_version": "2.28.1", "CLASSES": ["a", "b", "c"]}},
               tmp_path / "mask_rcnn.pth")
    converted = intern2.create_model("mask_rcnn_internimage_t", checkpoint_path=tmp_path / "mask_rcnn.pth",
                                     box_score_thresh=0.0, rpn_post_nms_top_n_test=50, **TINY).eval()
    torch.testing.assert_close(converted.roi_heads.box_predictor.cls_score.weight[0],
                               mmdet_state["roi_head.bbox_head.fc_cls.weight"][-1])
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        want, got = source(images)[0], converted(images)[0]
    assert len(want["boxes"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def test_unknown_mmdet_keys_are_named():
    state = torchvision_to_mmdet(_model().state_dict())
    state["roi_head.semantic_head.conv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="roi_head.semantic_head.conv.weight"):
        mmdet_to_torchvision(state)


def test_anchors_are_not_rounded():
    generator = UnroundedAnchorGenerator(((32,),), ((0.5, 1.0, 2.0),))
    base = generator.cell_anchors[0]
    half_w, half_h = 32 * 2 ** 0.5 / 2, 32 / 2 ** 0.5 / 2  # ratio h/w = 0.5; torchvision would round to 23, 11
    assert base[0].tolist() == pytest.approx([-half_w, -half_h, half_w, half_h], rel=1e-6)
    assert base[1].tolist() == [-16.0, -16.0, 16.0, 16.0]


def test_aligned_roi_align_matches_mmcv_semantics():
    features = {"0": torch.randn(1, 4, 16, 16)}
    boxes = [torch.tensor([[2.3, 3.1, 20.7, 25.2]])]
    pooler = AlignedMultiScaleRoIAlign(["0"], 7, sampling_ratio=0)
    got = pooler(features, boxes, [(64, 64)])
    want = roi_align(features["0"], [boxes[0]], 7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(got, want)
    unaligned = roi_align(features["0"], [boxes[0]], 7, spatial_scale=0.25, sampling_ratio=0, aligned=False)
    assert not torch.allclose(got, unaligned)


@pytest.mark.parametrize("heads", [{}, {"box_fc_channels": 64, "mask_channels": 32}])
def test_training_losses_and_gradients(heads):
    model = _model(**heads).train()
    if heads:
        assert model.roi_heads.box_head.fc7.out_features == 64 and model.roi_heads.mask_head[3][0].out_channels == 32
        assert intern2.create_model("mask_rcnn_internimage_t", **TINY, **heads).export_config()["mask_channels"] == 32
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    masks[1, 35:60, 30:55] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0], [30.0, 35.0, 55.0, 60.0]]),
                "labels": torch.tensor([1, 3]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad, without_grad[:5]


def test_imagenet_backbone_initialisation():
    classifier = intern2.create_model("internimage_t", **TINY["backbone"], num_classes=10)
    model = intern2.create_model("mask_rcnn_internimage_t", **TINY)
    intern2.load_checkpoint(model, classifier.state_dict())
    torch.testing.assert_close(model.backbone.body.patch_embed.conv1.weight, classifier.patch_embed.conv1.weight)
    assert model.pretrained_cfg["hf_hub_filename"] == "mask_rcnn_internimage_t_fpn_1x_coco.pth"


def test_detector_backbone_initialises_a_segmentor():
    """A trained detector's InternImage (under backbone.body.) loads into another model's backbone."""
    detector = _model()
    segmentor = intern2.create_model("upernet_internimage_t", backbone=TINY["backbone"], num_classes=3, channels=32,
                                     aux_channels=16)
    intern2.load_checkpoint(segmentor.backbone, detector.state_dict())
    torch.testing.assert_close(segmentor.backbone.levels[2].blocks[0].dcn.output_proj.weight,
                               detector.backbone.body.levels[2].blocks[0].dcn.output_proj.weight)
