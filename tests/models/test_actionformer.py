"""ActionFormer: parity with the official model's outputs (../shared/fixtures/tal/model), the official checkpoint
layouts, padding invariance, training targets and losses, post-processing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import fixture_path
from intern2.checkpoint import load_checkpoint
from intern2.models.actionformer import ActionFormer, batched_soft_nms, grid_to_seconds, seconds_to_grid, soft_nms_1d


def _official():
    """The fixture's reduced official model (float64) with its weights, config and recorded tensors."""
    from safetensors.torch import load_file
    folder = fixture_path("tal", "model")
    config = json.loads((folder / "config.json").read_text())
    model = ActionFormer(**ActionFormer.official_kwargs(config["model_kwargs"])).double().eval()
    load_checkpoint(model, folder / "weights.safetensors")
    return model, config, load_file(str(folder / "io.safetensors"))


def tiny(**overrides) -> ActionFormer:
    kwargs = dict(input_dim=6, num_classes=3, max_seq_len=32, arch=(2, 1, 2), embd_dim=16, fpn_dim=16, head_dim=16,
                  n_head=2, n_mha_win_size=5, regression_range=((0, 4), (4, 8), (8, 1000)), init_loss_norm=10)
    return ActionFormer(**{**kwargs, **overrides})


def test_every_level_equals_the_official_model():
    """Backbone, masks, points, class logits and boundary offsets of a padded batch of two videos."""
    model, _, io = _official()
    feats, mask = io["input.feats"], io["input.mask"]
    with torch.no_grad():
        backbone, masks = model.backbone(feats, mask)
        cls_logits, offsets, head_masks = model(feats, mask)
    points = model.points([m.shape[-1] for m in head_masks], torch.float64)
    for level in range(3):
        torch.testing.assert_close(backbone[level], io[f"backbone.feats.{level}"], rtol=0, atol=1e-12)
        assert torch.equal(masks[level], io[f"backbone.masks.{level}"])
        assert torch.equal(head_masks[level], io[f"neck.masks.{level}"])
        assert torch.equal(points[level], io[f"points.{level}"])
        torch.testing.assert_close(cls_logits[level], io[f"cls_logits.{level}"], rtol=0, atol=1e-12)
        torch.testing.assert_close(offsets[level], io[f"offsets.{level}"], rtol=0, atol=1e-12)


def test_detections_equal_the_official_model_end_to_end():
    """Each video alone, padded as officially: the same pre-NMS candidates (order included) and final
    detections (seconds, labels, order; scores within float32 rounding)."""
    model, config, io = _official()
    for k, video in enumerate(config["e2e_videos"]):
        feats = io[f"e2e.{k}.feats"]
        with torch.no_grad():
            segments, scores, labels = model.candidates(*model(*model.pad_features([feats])))
        torch.testing.assert_close(segments, io[f"e2e.{k}.prenms.segments"], rtol=0, atol=1e-12)
        torch.testing.assert_close(scores, io[f"e2e.{k}.prenms.scores"], rtol=0, atol=1e-12)
        assert torch.equal(labels, io[f"e2e.{k}.prenms.labels"])
        seconds, final_scores, final_labels = model.detect(feats, video["fps"], video["duration"],
                                                           video["feat_stride"], video["feat_num_frames"])
        np.testing.assert_array_equal(seconds, io[f"e2e.{k}.final.segments"].numpy())
        np.testing.assert_array_equal(final_labels, io[f"e2e.{k}.final.labels"].numpy())
        np.testing.assert_allclose(final_scores, io[f"e2e.{k}.final.scores"].numpy(), rtol=0, atol=1e-7)
        assert len(final_scores) == video["num_final"]


def test_soft_nms_and_seconds_equal_actionformers_postprocessing():
    """The official pre-NMS candidates through our soft-NMS and grid -> seconds give the official final
    detections: same segments, labels and order, scores within float32 rounding."""
    _, config, io = _official()
    test_cfg = config["model_kwargs"]["test_cfg"]
    assert test_cfg["nms_method"] == "soft" and test_cfg["multiclass_nms"]
    for k, video in enumerate(config["e2e_videos"]):
        segments, scores, labels = batched_soft_nms(
            io[f"e2e.{k}.prenms.segments"].numpy().astype(np.float32),  # the official kernel runs in float32
            io[f"e2e.{k}.prenms.scores"].numpy().astype(np.float32), io[f"e2e.{k}.prenms.labels"].numpy(),
            test_cfg["nms_sigma"], test_cfg["min_score"], test_cfg["max_seg_num"])
        seconds = grid_to_seconds(segments, video["fps"], video["duration"], video["feat_stride"],
                                  video["feat_num_frames"])
        np.testing.assert_array_equal(labels, io[f"e2e.{k}.final.labels"].numpy())
        np.testing.assert_array_equal(seconds, io[f"e2e.{k}.final.segments"].numpy())
        np.testing.assert_allclose(scores, io[f"e2e.{k}.final.scores"].numpy(), rtol=0, atol=1e-7)


def test_soft_nms_decays_overlaps_and_keeps_isolated_segments():
    segments = np.array([[0, 10], [0, 10], [20, 30], [0, 5]], dtype=np.float32)
    kept, scores, index = soft_nms_1d(segments, np.array([0.9, 0.8, 0.7, 0.001], dtype=np.float32), sigma=0.5)
    assert index.tolist() == [0, 2, 1]  # the half-overlapping low scorer falls below min_score and is dropped
    assert scores[0] == np.float32(0.9) and scores[1] == np.float32(0.7)  # no overlap: untouched
    assert scores[2] == pytest.approx(0.8 * np.exp(-1 / 0.5), rel=1e-6)  # identical segment: IoU 1


@pytest.mark.parametrize("name,config", [("actionformer_thumos14", "thumos14_internvideo_configs_thumos_yaml"),
                                         ("actionformer_activitynet", "activitynet_internvideo_configs_anet_yaml")])
def test_presets_have_the_official_full_size_layout(name, config):
    """The presets are InternVideo's configs: the same keys and shapes as the official models (plus our loss
    normaliser), the same parameter count; an official DataParallel checkpoint ('module.' keys, no normaliser)
    loads strictly and every key is consumed."""
    import intern2
    official = json.loads(fixture_path("tal", "state_dict_keys_full_size.json").read_text())[config]
    model = intern2.create_model(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if k != "loss_normalizer"}
    assert shapes == {entry["key"]: entry["shape"] for entry in official["keys"]}
    assert sum(p.numel() for p in model.parameters()) == official["num_parameters"]
    assert ActionFormer(**ActionFormer.official_kwargs(official["model_kwargs"])).config == model.config
    state = {f"module.{k}": torch.randn(v.shape) for k, v in model.state_dict().items() if k != "loss_normalizer"}
    load_checkpoint(model, {"epoch": 30, "state_dict_ema": state})
    assert torch.equal(model.state_dict()["cls_head.cls_head.conv.bias"], state["module.cls_head.cls_head.conv.bias"])


def test_unsupported_official_choices_name_the_key():
    _, config, _ = _official()
    for section, key, value in (("model_kwargs", "fpn_type", "fpn"), ("test_cfg", "nms_method", "hard")):
        kwargs = json.loads(json.dumps(config["model_kwargs"]))
        (kwargs if section == "model_kwargs" else kwargs[section])[key] = value
        with pytest.raises(ValueError, match=key):
            ActionFormer.official_kwargs(kwargs)


@pytest.mark.parametrize("use_rel_pe", [False, True])
def test_valid_outputs_do_not_depend_on_padding(use_rel_pe):
    """A video's logits and offsets at its valid positions are the same alone (padded to max_seq_len) and in a
    longer padded batch next to a longer video; padded positions are zero."""
    torch.manual_seed(0)
    model = tiny(use_rel_pe=use_rel_pe).double().eval()
    short, long = torch.randn(6, 13, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    with torch.no_grad():
        alone = model(*model.pad_features([short]))
        batched = model(*model.pad_features([short, long]))
    for level, (a, b) in enumerate(zip(alone[0], batched[0])):
        valid = int(alone[2][level][0, 0].sum())
        torch.testing.assert_close(a[0, :, :valid], b[0, :, :valid], rtol=0, atol=1e-12)
        assert not b[0, :, int(batched[2][level][0, 0].sum()):].any()
    assert batched[0][0].shape[-1] == 48  # 40 -> the next multiple of the largest stride x window (4 x 4 x 2 = 16)


def test_targets_follow_centre_sampling_and_regression_ranges():
    """One 6-step action [7, 13]: a point is positive when it lies within 1.5 strides of the centre and its level's
    regression range holds its farther boundary distance."""
    model = tiny().double()
    points = torch.cat(model.points([32, 16, 8], torch.float64))
    cls, reg = model.assign_targets(points, torch.tensor([[7.0, 13.0]], dtype=torch.float64), torch.tensor([2]))
    level0 = cls[:32, 2].nonzero()[:, 0].tolist()
    assert level0 == [9, 10, 11]  # |t - 10| < 1.5 and max distance <= 4
    torch.testing.assert_close(reg[10], torch.tensor([3.0, 3.0], dtype=torch.float64))
    # Level 1 (stride 2, range [4, 8], radius 3): positions 8 and 12 (farther boundary 5); 10 (3) is level 0's.
    assert (points[32:48][cls[32:48, 2] > 0, 0]).tolist() == [8.0, 12.0]
    assert cls[:, [0, 1]].sum() == 0 and cls[48:].sum() == 0  # level 2's range starts at 8
    empty_cls, empty_reg = model.assign_targets(points, torch.zeros(0, 2, dtype=torch.float64),
                                                torch.zeros(0, dtype=torch.long))
    assert not empty_cls.any() and not empty_reg.any()


def test_loss_trains_and_resumes_its_normaliser():
    """The losses are finite with finite gradients (padded rows included), the normaliser EMA moves only in
    training and is saved with the weights; a few steps fit one video's segments."""
    torch.manual_seed(0)
    model = tiny(droppath=0.0)
    feats = torch.randn(6, 30)
    segments, labels = [torch.tensor([[4.0, 12.0], [18.0, 26.0]])], [torch.tensor([0, 1])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(30):
        losses = model.loss(*model(*model.pad_features([feats])), segments, labels)
        losses["final_loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        first = first or float(losses["final_loss"].detach())
    assert float(losses["final_loss"].detach()) < 0.5 * first
    normaliser = float(model.loss_normalizer)
    assert normaliser != 10 and "loss_normalizer" in model.state_dict()
    model.eval()
    with torch.no_grad():
        model.loss(*model(*model.pad_features([feats])), segments, labels)
    assert float(model.loss_normalizer) == normaliser


def test_seconds_and_grid_are_inverse():
    seconds = np.array([[0.8, 2.4], [3.0, 5.5]])
    grid = seconds_to_grid(seconds, fps=30, feat_stride=4, feat_num_frames=16)
    np.testing.assert_allclose(grid_to_seconds(grid, 30, 10.0, 4, 16), seconds, rtol=1e-6)


def test_bad_feature_shapes_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"expected features \(B, 6, T\)"):
        model(torch.zeros(1, 5, 32), torch.ones(1, 1, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.zeros(1, 6, 40), torch.ones(1, 1, 40, dtype=torch.bool))
