"""Mask2Former: equal to the official mmseg/mmdet Mask2Former head (golden fixture, float64: pixel decoder, every
decoder prediction, the semantic map and mmseg's rescaling), the official full-size InternImage-H layout, training."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import intern2
from intern2.models.mask2former import Mask2FormerHead, semantic_targets

from conftest import FIXTURES, load_fixture

FIXTURE = "dense-heads/mask2former"
pytestmark = pytest.mark.skipif(not (FIXTURES / f"{FIXTURE}.safetensors").exists(), reason="fixture not present")
TINY = dict(backbone=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], level2_post_norm_block_ids=None,
                          drop_path_rate=0.0),
            num_classes=4, feat_channels=32, num_queries=10, num_heads=4, num_decoder_layers=3, decoder_feedforward=64,
            num_encoder_layers=1, encoder_feedforward=64, num_feats=16, groups=8, train_points=256)


@pytest.fixture(scope="module")
def official():
    meta, t = load_fixture(FIXTURE)
    p = meta["params"]
    head = Mask2FormerHead(p["in_ch"], [4, 8, 16, 32], p["C"], p["F"], p["F"], p["Q"], p["heads"], p["Ld"], p["ffn"],
                           p["Le"], p["ffn"], p["points"], p["F"] // 2, p["gn"]).double().eval()
    head.load_state_dict({k[len("state.decode_head."):]: v for k, v in t.items()
                          if k.startswith("state.decode_head.")})  # strict: the official names as they are
    with torch.no_grad():
        cls, masks, extra = head([t[f"input.backbone_feat{i}"] for i in range(4)])
    return meta, t, head, cls, masks, extra


@pytest.mark.parametrize("reference,atol", [("test_exact64", 1e-9), ("test", 1e-5)])
def test_every_prediction_equals_the_official_head(official, reference, atol):
    """The initial and every layer's class / mask predictions (masked attention from the previous one) and the
    semantic map: exact float64 at 1e-9, the run as shipped (float32 positional encodings) at the README's 1e-5."""
    _, t, head, cls, masks, _ = official
    torch.testing.assert_close(torch.stack(cls), t[f"{reference}.cls_preds"], atol=atol, rtol=0)
    torch.testing.assert_close(torch.stack(masks), t[f"{reference}.mask_preds"], atol=atol, rtol=0)
    torch.testing.assert_close(head.semantic(cls[-1], masks[-1]), t[f"{reference}.seg_mask"], atol=atol, rtol=0)


def test_pixel_decoder_and_test_path_equal_the_official_ones(official):
    """Pixel-decoder memories (coarsest first) and mask features; mmseg's resize to the image, to ori_shape, and
    the argmax of its softmax: the same prediction for every pixel."""
    meta, t, head, cls, masks, extra = official
    torch.testing.assert_close(extra["mask_features"], t["test.mask_features"], atol=1e-5, rtol=0)
    for i, memory in enumerate(extra["memories"]):
        torch.testing.assert_close(memory, t[f"test.multi_scale_memory{i}"], atol=1e-5, rtol=0)
    image = F.interpolate(head.semantic(cls[-1], masks[-1]), size=tuple(meta["params"]["img"]), mode="bilinear",
                          align_corners=False)
    torch.testing.assert_close(image, t["test.encode_decode"], atol=1e-5, rtol=0)
    rescaled = F.interpolate(image, size=tuple(meta["params"]["ori"]), mode="bilinear", align_corners=False)
    torch.testing.assert_close(rescaled, t["test.seg_logit_rescaled"], atol=1e-5, rtol=0)
    assert torch.equal(rescaled.softmax(1).argmax(1), t["test.seg_pred"])


def test_official_full_size_layout_loads_as_it_is():
    """The published Mask2Former-InternImage-H ADE20K checkpoint's 1627 tensors (1.31B values) are our state dict."""
    listing = json.loads((FIXTURES / "dense-heads/mask2former_h_full_keys.json").read_text())
    with torch.device("meta"):
        model = intern2.create_model("mask2former_internimage_h")
    ours = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}
    assert ours == {k: [shape, dtype] for k, shape, dtype in listing["keys"]}
    assert sum(v.numel() for v in model.state_dict().values()) == listing["num_params"]
    assert model.pretrained_cfg["test_size"] == [3584, 896] and model.pretrained_cfg["label_names"] == "ade20k"


def test_semantic_targets_are_one_mask_per_present_class():
    labels = torch.tensor([[[0, 0, 2], [255, 2, 2]], [[1, 1, 1], [1, 7, 255]]])
    classes, masks = semantic_targets(labels, num_classes=4)
    assert [c.tolist() for c in classes] == [[0, 2], [1]]  # 255 ignored, 7 out of range
    assert masks[0].tolist() == [[[True, True, False], [False, False, False]],
                                 [[False, False, True], [False, True, True]]]
    assert masks[1].sum() == 4


def test_training_losses_gradients_and_a_perfect_prediction():
    """Every prediction's class / mask / dice loss, gradients everywhere; an image with only ignored pixels has no
    masks to match; the losses prefer the right answer (its mask and dice losses are far smaller than those of the
    inverted mask; not zero: three quarters of the points are sampled where the upsampled logits cross 0)."""
    torch.manual_seed(0)
    model = intern2.create_model("mask2former_internimage_h", **TINY).train()
    labels = torch.randint(0, 4, (2, 64, 64))
    losses = model(torch.randn(2, 3, 64, 64), labels)
    assert set(losses) == {f"{p}loss_{n}" for p in ("", "d0.", "d1.", "d2.") for n in ("cls", "mask", "dice")}
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    ignored = model(torch.randn(1, 3, 64, 64), torch.full((1, 64, 64), 255))
    assert all(torch.isfinite(v) for v in ignored.values()) and ignored["loss_mask"].item() == 0
    criterion = model.criterion
    gt = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt[0, 4:12, 4:12] = True
    good = torch.where(gt, 8.0, -8.0).double()
    cls = torch.full((1, 3, 5), -5.0, dtype=torch.float64)
    cls[0, 0, 2] = 5.0
    right = criterion.single(cls, torch.stack([good[0], -good[0], -good[0]])[None], [torch.tensor([2])], [gt])
    wrong = criterion.single(cls, torch.stack([-good[0], -good[0], -good[0]])[None], [torch.tensor([2])], [gt])
    assert right[0].item() == wrong[0].item()  # the same match and class targets
    assert right[1].item() < wrong[1].item() / 10 and right[2].item() < wrong[2].item() / 2
