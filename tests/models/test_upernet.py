"""UperNet: mmseg key layout, official-backbone keys, shapes, slide inference, checkpoint loading."""
from __future__ import annotations

import json

import pytest
import torch

import intern2
from intern2 import cli
from conftest import fixture_path
from intern2.pipelines.segment import slide_inference

TINY = dict(backbone=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0),
            channels=32, aux_channels=16, num_classes=5)


def test_mmseg_key_layout():
    model = intern2.create_model("upernet_internimage_t", **TINY)
    keys = set(model.state_dict())
    for expected in ("decode_head.psp_modules.0.1.conv.weight", "decode_head.psp_modules.3.1.bn.running_var",
                     "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.bn.weight",
                     "decode_head.fpn_convs.0.conv.weight", "decode_head.fpn_bottleneck.conv.weight",
                     "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight",
                     "auxiliary_head.conv_seg.bias", "backbone.levels.0.blocks.0.gamma1"):
        assert expected in keys, expected
    assert not any(k.startswith("backbone.head.") or k.startswith("backbone.conv_head.") for k in keys)
    # channels: PPM 4 x 32 + last level 128 into the bottleneck; FPN bottleneck sees 4 x 32.
    assert model.state_dict()["decode_head.bottleneck.conv.weight"].shape == (32, 128 + 4 * 32, 3, 3)
    assert model.state_dict()["decode_head.fpn_bottleneck.conv.weight"].shape == (32, 4 * 32, 3, 3)
    assert model.state_dict()["auxiliary_head.convs.0.conv.weight"].shape == (16, 64, 3, 3)


def test_official_backbone_keys_for_h():
    entry = json.loads(fixture_path("internimage", "internimage_keys.json").read_text())[
        "det_seg_backbones"]["upernet_internimage_h_896_160k_ade20k.backbone"]
    with torch.device("meta"):
        model = intern2.create_model("upernet_internimage_h")
    backbone = [(k[len("backbone."):], list(v.shape)) for k, v in model.state_dict().items()
                if k.startswith("backbone.")]
    assert backbone == [(k, s) for k, s, _ in entry["keys"]]
    assert model.num_classes == 150
    assert model.pretrained_cfg["hf_hub_filename"] == "upernet_internimage_h_896_160k_ade20k.pth"


def test_forward_shapes_heads_and_slide():
    model = intern2.create_model("upernet_internimage_t", **TINY)
    x = torch.randn(2, 3, 64, 96)
    model.train()
    decode, aux = model(x, return_heads=True)
    assert decode.shape == (2, 5, 16, 24) and aux.shape == (2, 5, 4, 6)
    model.eval()
    with torch.no_grad():
        whole = model(x)
        assert whole.shape == (2, 5, 64, 96)
        # One window covering the image is the whole-image prediction; overlapping windows average.
        torch.testing.assert_close(slide_inference(model, x, crop=(64, 96), stride=(64, 64)), whole)
        assert slide_inference(model, x, crop=(64, 64), stride=(32, 32)).shape == whole.shape


def test_mmseg_checkpoint_and_backbone_only_loading(tmp_path):
    source = intern2.create_model("upernet_internimage_t", **TINY).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"state_dict": source.state_dict(), "meta": {"mmseg_version": "0.27.0"}}, tmp_path / "upernet.pth")
    model = intern2.create_model("upernet_internimage_t", checkpoint_path=tmp_path / "upernet.pth", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=0, rtol=0)
    # An ImageNet classifier checkpoint initialises the backbone (layer-scale gammas become 1.0).
    classifier = intern2.create_model("internimage_t", **TINY["backbone"], num_classes=10)
    fresh = intern2.create_model("upernet_internimage_t", **TINY)
    intern2.load_checkpoint(fresh.backbone, classifier.state_dict())
    torch.testing.assert_close(fresh.backbone.patch_embed.conv1.weight, classifier.patch_embed.conv1.weight)
    assert all(bool((v == 1).all()) for k, v in fresh.backbone.state_dict().items() if k.endswith("gamma1"))


def test_save_pretrained_round_trip(tmp_path):
    model = intern2.create_model("upernet_internimage_t", **TINY).eval()
    intern2.save_pretrained(model, tmp_path)
    loaded = intern2.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_onnx_export_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from intern2.export import ExportCheckError, export_onnx
    model = intern2.create_model("upernet_internimage_t", **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    diff = export_onnx(model, tmp_path / "upernet.onnx", img_size=64, dynamic=False)  # checked at batch 3
    assert 0 <= diff <= 1e-4
    # A failed check writes nothing: the previous file stays whole, no temp folder is left, the mode is restored.
    before = (tmp_path / "upernet.onnx").read_bytes()
    model.train()
    with pytest.raises(ExportCheckError, match="differs from PyTorch .* nothing written"):
        export_onnx(model, tmp_path / "upernet.onnx", img_size=64, dynamic=False, atol=-1.0)
    assert model.training and (tmp_path / "upernet.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upernet.onnx"]


def test_a_failed_export_leaves_no_folder_it_made(tmp_path):
    from intern2.export import ExportCheckError, _write_atomically

    def fails(target):
        target.write_bytes(b"half a graph")
        raise ExportCheckError("check failed")
    with pytest.raises(ExportCheckError):
        _write_atomically(tmp_path / "new" / "deeper" / "m.onnx", fails)
    assert list(tmp_path.iterdir()) == []
    _write_atomically(tmp_path / "new" / "m.onnx", lambda target: target.write_bytes(b"graph"))
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["m.onnx"]


def test_cli_exports_a_segmentor_at_its_fixed_size(tmp_path, capsys):
    """A dynamic UperNet graph would be wrong at other sizes (its logits resize is traced at one): the CLI
    exports it fixed, batch dynamic, whatever --static says."""
    pytest.importorskip("onnxruntime")
    intern2.save_pretrained(intern2.create_model("upernet_internimage_t", **TINY), tmp_path / "seg")
    assert cli.main(["export", "onnx", "--checkpoint", str(tmp_path / "seg"), "--out", str(tmp_path / "s.onnx"),
                     "--img-size", "64"]) == 0
    assert "input image (B, 3, 64, 64) (onnxruntime vs torch max |diff|" in capsys.readouterr().out


def test_cli_exports_a_bfloat16_segmentor_at_its_test_short_side(tmp_path, capsys):
    """Without --img-size a segmentor exports at its protocol's short side (ADE20K: 512), and a folder saved in
    bfloat16 exports as the float32 graph."""
    pytest.importorskip("onnxruntime")
    model = intern2.create_model("upernet_internimage_t", **TINY)
    assert min(model.pretrained_cfg["test_size"]) == 512
    intern2.save_pretrained(model.to(torch.bfloat16), tmp_path / "seg")
    assert cli.main(["export", "onnx", "--checkpoint", str(tmp_path / "seg"), "--out", str(tmp_path / "s.onnx"),
                     "--no-check"]) == 0
    assert "input image (B, 3, 512, 512)" in capsys.readouterr().out
