"""HF transformers VideoMAE folders load as they are (intern2.from_pretrained, --checkpoint) and compute what
transformers computes, for classifiers and pre-training models in every layout HF writes."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import intern2  # noqa: E402
from intern2 import cli  # noqa: E402
from intern2.models.video_vit import tube_mask  # noqa: E402

SMALL = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=48, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=192, decoder_hidden_size=32, decoder_num_hidden_layers=2,
             decoder_num_attention_heads=4, decoder_intermediate_size=64)


def _randomise(model):
    """Every tensor random (LayerNorms included), so that a swapped or dropped tensor shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_classifier_folder_matches_transformers(tmp_path, mean_pooling):
    config = transformers.VideoMAEConfig(**SMALL, num_labels=7, use_mean_pooling=mean_pooling,
                                         id2label={i: f"action {i}" for i in range(7)})
    reference = _randomise(transformers.VideoMAEForVideoClassification(config))
    reference.save_pretrained(tmp_path)
    model = intern2.from_pretrained(tmp_path).eval()
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # HF: (B, T, C, H, W)
    with torch.no_grad():
        torch.testing.assert_close(model(video.transpose(1, 2)), reference(pixel_values=video).logits,
                                   atol=1e-6, rtol=0)
    assert model.pretrained_cfg["label_names"][:2] == ["action 0", "action 1"]


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_pretraining_folder_matches_transformers(tmp_path, mean_pooling):
    """Both encoder layouts (HF's default use_mean_pooling=True has no final encoder norm) and a decoder MLP
    narrower than the encoder's."""
    config = transformers.VideoMAEConfig(**SMALL, use_mean_pooling=mean_pooling, norm_pix_loss=True)
    reference = _randomise(transformers.VideoMAEForPreTraining(config))
    reference.save_pretrained(tmp_path)
    model = intern2.from_pretrained(tmp_path).eval()
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = tube_mask(2, model.grid, 0.75, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(video.transpose(1, 2), mask),
                                   reference(pixel_values=video, bool_masked_pos=mask).logits, atol=1e-6, rtol=0)


def test_an_ssv2_head_gets_the_ssv2_protocol_and_predicts_from_the_cli(tmp_path, capsys):
    pytest.importorskip("av")
    import numpy as np
    from intern2.data.video import write_video
    config = transformers.VideoMAEConfig(**SMALL, num_labels=174)
    _randomise(transformers.VideoMAEForVideoClassification(config)).save_pretrained(tmp_path / "hf")
    model = intern2.from_pretrained(tmp_path / "hf")
    assert (model.pretrained_cfg["tag"], model.pretrained_cfg["sampling"], model.pretrained_cfg["test_clips"]) == \
        ("ssv2", "segment", 2)
    video = write_video(tmp_path / "clip.mp4", np.zeros((8, 40, 48, 3), dtype=np.uint8))
    assert cli.main(["predict", str(video), "--checkpoint", str(tmp_path / "hf"), "--topk", "2", "--json",
                     "--crops", "1", "--short-side", "32"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["top"]) == 2 and result["top"][0]["label"] == f"LABEL_{result['top'][0]['index']}"


def test_other_hf_model_types_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="expected an 'architecture' known to intern2 or an HF model_type intern2 "
                                         "reads \\(internimage, m2m_100, videomae\\), got 'vit'"):
        intern2.from_pretrained(tmp_path)
