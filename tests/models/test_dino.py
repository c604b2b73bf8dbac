"""DINO-4scale: equal to the official mmdet DINO head (golden fixture, float64, every recorded stage), the official
full-size checkpoint layout, torchvision's detector contract."""
from __future__ import annotations

import json

import pytest
import torch

import intern2
from intern2.models.dino import ChannelMapper, DINOHead

from conftest import FIXTURES, load_fixture

FIXTURE = "dense-heads/dino"
pytestmark = pytest.mark.skipif(not (FIXTURES / f"{FIXTURE}.safetensors").exists(), reason="fixture not present")
TINY_BACKBONE = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
SIZES = [(64, 96), (50, 70)]  # img_shape of the two images inside the padded 64 x 96 batch
RECORDED = {"memory": "memory", "enc_output_memory": "enc_output_memory", "enc_outputs_class": "enc_outputs_class",
            "enc_topk_score": "enc_topk_scores", "enc_topk_anchor": "enc_topk_anchors",
            "dec_inter_states": "inter_states", "dec_inter_references": "inter_references",
            "all_cls_scores": "all_cls_scores", "all_bbox_preds": "all_bbox_preds"}


@pytest.fixture(scope="module")
def official():
    """The fixture's reduced neck + head (official state loaded strictly, no renaming) in float64, and its run."""
    meta, t = load_fixture(FIXTURE)
    p = meta["params"]
    neck = ChannelMapper(p["in_ch"], p["E"], 4, p["gn"]).double().eval()
    head = DINOHead(p["C"], p["E"], p["Q"], p["E"] // 2, 20, p["max_per_img"], num_heads=p["heads"],
                    num_points=p["points"], num_encoder_layers=p["Le"], num_decoder_layers=p["Ld"],
                    feedforward_channels=p["F"]).double().eval()
    neck.load_state_dict({k[len("state.neck."):]: v for k, v in t.items() if k.startswith("state.neck.")})
    head.load_state_dict({k[len("state.bbox_head."):]: v for k, v in t.items() if k.startswith("state.bbox_head.")})
    with torch.no_grad():
        feats = neck([t[f"input.backbone_feat{i}"] for i in range(3)])
        out = head(feats, SIZES, tuple(p["pad"]))
    return meta, t, neck, head, feats, out


@pytest.mark.parametrize("reference,atol", [("test_exact64", 1e-9), ("test", 1e-5)])
def test_every_stage_equals_the_official_head(official, reference, atol):
    """Neck, encoder memory, proposals, query selection, every decoder layer and the layer outputs: equal to the
    exact-float64 official run at 1e-9 and to the run as shipped (float32 islands) at the README's 1e-5."""
    _, t, _, _, feats, out = official
    for i, level in enumerate(feats):
        torch.testing.assert_close(level, t[f"{reference}.neck_out{i}"], atol=atol, rtol=0)
    for name, field in RECORDED.items():
        torch.testing.assert_close(getattr(out, field), t[f"{reference}.{name}"], atol=atol, rtol=0, msg=name)
    proposals, want = out.enc_output_proposals, t[f"{reference}.enc_output_proposals"]
    assert torch.equal(torch.isinf(proposals), torch.isinf(want))  # padded / edge positions are +inf in both
    finite = torch.isfinite(want)
    torch.testing.assert_close(proposals[finite], want[finite].double(), atol=atol, rtol=0)  # as shipped: float32
    assert torch.equal(out.enc_topk_indices, t[f"{reference}.enc_topk_indices"])


@pytest.mark.parametrize("reference,atol", [("test_exact64", 1e-9), ("test", 1e-4)])
def test_detections_equal_the_official_get_bboxes(official, reference, atol):
    """Top-100 (query, class) pairs, boxes in pixels of each image (the fixture rescales by 1.25)."""
    _, t, _, head, _, out = official
    for b, result in enumerate(head.detections(out.all_cls_scores[-1], out.all_bbox_preds[-1], SIZES)):
        want = t[f"{reference}.det_bboxes{b}"]
        torch.testing.assert_close(result["boxes"] / 1.25, want[:, :4], atol=atol, rtol=0)
        torch.testing.assert_close(result["scores"], want[:, 4], atol=atol, rtol=0)
        assert (result["labels"] - 1).tolist() == t[f"{reference}.det_labels{b}"].tolist()


def test_official_full_size_layout_loads_as_it_is():
    """The published DINO-T checkpoint's 994 tensors are exactly our state dict (names, shapes, dtypes)."""
    listing = json.loads((FIXTURES / "dense-heads/dino_t_full_keys.json").read_text())
    with torch.device("meta"):
        model = intern2.create_model("dino_4scale_internimage_t")
    ours = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}
    assert ours == {k: [shape, dtype] for k, shape, dtype in listing["keys"]}
    assert sum(v.numel() for v in model.state_dict().values()) == listing["num_params"]
    assert model.bbox_head.transformer.num_query == 900 and model.bbox_head.max_per_img == 100


def test_detector_contract_and_checkpoint_round_trip(tmp_path):
    """model(list of images) -> torchvision dicts at each image's size; an official-layout file loads strictly and
    gives the same detections; a bare InternImage state dict initialises the backbone only."""
    kwargs = dict(backbone=TINY_BACKBONE, num_classes=3, min_size=64, max_size=96, embed_dims=32, num_query=20,
                  max_per_img=10, num_feats=16, neck_groups=8, num_encoder_layers=1, num_decoder_layers=2,
                  feedforward_channels=64)
    torch.manual_seed(0)
    model = intern2.create_model("dino_4scale_internimage_t", **kwargs).eval()
    images = [torch.rand(3, 48, 64), torch.rand(3, 60, 40)]
    with torch.no_grad():
        outputs = model(images)
    for image, output in zip(images, outputs):
        assert set(output) == {"boxes", "labels", "scores"} and len(output["boxes"]) == 10
        assert (output["labels"] >= 1).all() and (output["labels"] <= 3).all()
        assert (output["boxes"][:, 0::2] <= image.shape[2] + 1e-4).all()
        assert (output["boxes"][:, 1::2] <= image.shape[1] + 1e-4).all()
        assert (output["scores"][:-1] >= output["scores"][1:]).all()
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "dino.pth")
    loaded = intern2.create_model("dino_4scale_internimage_t", checkpoint_path=tmp_path / "dino.pth", **kwargs).eval()
    with torch.no_grad():
        again = loaded(images)
    for a, b in zip(outputs, again):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    classifier = intern2.create_model("internimage_t", **TINY_BACKBONE, num_classes=10)
    intern2.load_checkpoint(loaded, classifier.state_dict())
    torch.testing.assert_close(loaded.backbone.patch_embed.conv1.weight, classifier.patch_embed.conv1.weight)
    torch.testing.assert_close(loaded.neck.convs[0].conv.weight, model.neck.convs[0].conv.weight)
    segmentor = intern2.create_model("upernet_internimage_t", backbone=TINY_BACKBONE, num_classes=3, channels=16,
                                     aux_channels=16)  # e.g. the shapes-segment recipe's model
    intern2.load_checkpoint(loaded, segmentor.state_dict())
    torch.testing.assert_close(loaded.backbone.levels[2].blocks[0].dcn.output_proj.weight,
                               segmentor.backbone.levels[2].blocks[0].dcn.output_proj.weight)


def _train_head(official):
    meta, t, neck, head, _, _ = official
    p = meta["params"]
    train_head = DINOHead(p["C"], p["E"], p["Q"], p["E"] // 2, 20, p["max_per_img"], num_dn_queries=p["ndn"],
                          num_heads=p["heads"], num_points=p["points"], num_encoder_layers=p["Le"],
                          num_decoder_layers=p["Ld"], feedforward_channels=p["F"]).double()
    train_head.load_state_dict(head.state_dict())
    gt_boxes = [t["train.gt_bboxes0"], t["train.gt_bboxes1"]]
    gt_labels = [t["train.gt_labels0"], t["train.gt_labels1"]]
    return train_head.train(), neck.train(), gt_boxes, gt_labels


def test_training_losses_equal_the_official_ones(official):
    """With the official run's denoising queries, all 15 official losses (encoder top-k, both decoder layers'
    matching and denoising parts: focal / L1 / GIoU after Hungarian matching) to 1e-9; every parameter gets a
    gradient."""
    from intern2.heads.detr_losses import DenoisingQueries
    meta, t, *_ = official
    head, neck, gt_boxes, gt_labels = _train_head(official)
    dn = DenoisingQueries(t["train.dn_label_query"], t["train.dn_bbox_query"], t["train.dn_attn_mask"],
                          meta["train"]["dn_meta"]["pad_size"], meta["train"]["dn_meta"]["num_dn_group"])
    feats = neck([t[f"input.backbone_feat{i}"] for i in range(3)])
    out = head(feats, SIZES, tuple(meta["params"]["pad"]), dn.label, dn.boxes, dn.attn_mask)
    losses = head.loss(out, gt_boxes, gt_labels, SIZES, dn)
    assert set(losses) == set(meta["train"]["loss_keys"])
    for name, value in losses.items():
        torch.testing.assert_close(value.reshape(()), t[f"train.loss.{name}"], atol=1e-9, rtol=0, msg=name)
    sum(losses.values()).backward()
    without = [n for n, p in head.named_parameters() if p.grad is None and n != "label_embedding.weight"]
    assert not without, without[:5]  # the given dn queries are constants: only the label embedding gets none


def test_denoising_generator_reproduces_the_official_queries(official):
    """Seeded as the official run, the generator draws the same label flips and box jitter: the same queries."""
    meta, t, *_ = official
    head, _, gt_boxes, gt_labels = _train_head(official)
    torch.manual_seed(0)
    dn = head.denoising_queries(gt_boxes, gt_labels, SIZES)
    assert (dn.pad_size, dn.num_groups) == (24, 4)
    torch.testing.assert_close(dn.label, t["train.dn_label_query"], atol=1e-12, rtol=0)
    torch.testing.assert_close(dn.boxes, t["train.dn_bbox_query"], atol=1e-12, rtol=0)
    assert torch.equal(dn.attn_mask, t["train.dn_attn_mask"])


def test_training_forward_through_the_model():
    """model(images, targets) in train mode: the loss dict with every key, an image without objects included."""
    torch.manual_seed(0)
    model = intern2.create_model("dino_4scale_internimage_t", backbone=TINY_BACKBONE, num_classes=3, min_size=64,
                                 max_size=96, embed_dims=32, num_query=20, num_feats=16, neck_groups=8,
                                 num_encoder_layers=1, num_decoder_layers=2, feedforward_channels=64,
                                 num_dn_queries=6).train()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 30.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = model([torch.rand(3, 48, 64), torch.rand(3, 60, 40)], targets)
    assert {"interm_loss_cls", "loss_cls", "d0.loss_bbox", "dn_loss_iou", "d0.dn_loss_cls"} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    sum(v.sum() for v in losses.values()).backward()
    assert model.bbox_head.label_embedding.weight.grad is not None
    empty = model([torch.rand(3, 48, 64)], [targets[1]])  # no objects at all: zero denoising queries
    assert all(torch.isfinite(v).all() for v in empty.values())
