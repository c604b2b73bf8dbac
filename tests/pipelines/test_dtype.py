"""bfloat16 inference: `dtype='bf16'` in the pipelines and `--dtype bf16` on the CLI run the model in bfloat16 (a
model the caller converted with `.to(torch.bfloat16)` too), agree with float32, fall back to float32 with a warning
on a CPU without bfloat16 instructions, and are refused where a family runs in float32 only."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import intern2
import intern2.pipelines.common as common
from intern2 import cli
from intern2.pipelines.image_cls import ImageClassificationPipeline

BACKBONE = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
VIDEO = dict(embed_dim=32, depth=1, num_heads=2, patch_size=16, img_size=32, all_frames=4, num_classes=3)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """As on a CPU with AVX-512-BF16 / AMX (elsewhere torch emulates bfloat16: same numbers, slower)."""
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    model = intern2.create_model("internimage_t", num_classes=3, **BACKBONE)
    model.pretrained_cfg.update(input_size=(3, 64, 64), label_names=["cat", "dog", "bird"])
    folder = tmp_path_factory.mktemp("cls") / "model"
    intern2.save_pretrained(model, folder)
    image = folder.parent / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    return folder, image


def test_bf16_pipeline_and_cli_agree_with_each_other_and_with_fp32(classifier, bf16_cpu, capsys):
    folder, image = classifier
    fp32 = ImageClassificationPipeline.from_pretrained(str(folder))
    bf16 = ImageClassificationPipeline.from_pretrained(str(folder), dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    answer = bf16(str(image), topk=3)
    reference = fp32(str(image), topk=3)
    assert [t["label"] for t in answer["top"]][0] == reference["top"][0]["label"]
    np.testing.assert_allclose([t["prob"] for t in answer["top"]], [t["prob"] for t in reference["top"]], atol=3e-2)
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(folder), str(image), "--dtype", "bf16", "--topk", "3",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"] == answer["top"]
    # A model converted by the caller runs in bfloat16 too: the pipeline casts the inputs to it.
    converted = ImageClassificationPipeline(intern2.from_pretrained(str(folder)).to(torch.bfloat16))
    assert converted(str(image), topk=3)["top"] == answer["top"]


def test_bf16_falls_back_to_fp32_without_the_instructions(classifier, monkeypatch, caplog):
    folder, image = classifier
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        pipeline = ImageClassificationPipeline.from_pretrained(str(folder), dtype="bf16")
    assert pipeline.dtype == torch.float32 and "no bfloat16 instructions" in caplog.text
    assert pipeline(str(image))["top"] == ImageClassificationPipeline.from_pretrained(str(folder))(str(image))["top"]


def test_video_and_segmentation_run_in_bf16(tmp_path, bf16_cpu):
    pytest.importorskip("av")
    from intern2.data.video import write_video
    from intern2.pipelines.segment import SegmentationPipeline
    from intern2.pipelines.video_cls import VideoClassificationPipeline
    torch.manual_seed(0)
    video = write_video(tmp_path / "clip.mp4", np.random.default_rng(1).integers(0, 255, (12, 32, 48, 3),
                                                                                   dtype=np.uint8))
    model = intern2.create_model("videomae_vit_s", **VIDEO)
    fp32 = VideoClassificationPipeline(model)(str(video), topk=3)
    bf16 = VideoClassificationPipeline(model, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    np.testing.assert_allclose([t["prob"] for t in bf16(str(video), topk=3)["top"]],
                               [t["prob"] for t in fp32["top"]], atol=3e-2)
    assert bf16.features(str(video)).dtype == torch.float32
    segmentor = intern2.create_model("upernet_internimage_t", num_classes=4, backbone=BACKBONE, channels=32)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    expected = SegmentationPipeline(segmentor, test_size=(64, 32))(image)
    answer = SegmentationPipeline(segmentor, test_size=(64, 32), dtype=torch.bfloat16)(image)
    assert answer["classes"][0]["label"] == expected["classes"][0]["label"]


def test_float32_only_families_refuse_bf16(capsys):
    from intern2.pipelines.detect import DetectionPipeline
    detector = intern2.create_model("mask_rcnn_internimage_t", backbone=BACKBONE, fpn_channels=32, num_classes=2,
                                    min_size=64, max_size=96)
    with pytest.raises(ValueError, match="DetectionPipeline runs in float32 only"):
        DetectionPipeline(detector, dtype="bf16")
    with pytest.raises(ValueError, match="expected fp32 or bf16"):
        DetectionPipeline(detector, dtype="fp16")


def test_serve_refuses_int8_with_bf16(capsys):
    pytest.importorskip("uvicorn")
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", "--translator", "nowhere", "--int8", "--dtype", "bf16"])
    assert stop.value.code == 2 and "--int8 and --dtype bf16: choose one" in capsys.readouterr().err


def test_video_text_pipeline_runs_in_bf16(tmp_path, bf16_cpu):
    pytest.importorskip("av")
    pytest.importorskip("tokenizers")
    from intern2.data.video import write_video
    from intern2.pipelines.video_text import VideoTextPipeline
    from intern2.text.bpe import BPETokenizer
    captions = ["a red circle moves to the right", "a blue square turns", "a green star fades in"]
    torch.manual_seed(0)
    model = intern2.create_model("internvideo_mm_tiny", num_frames=4)
    tokenizer = BPETokenizer.train(captions, vocab_size=300, context_length=32)
    video = write_video(tmp_path / "clip.mp4", np.random.default_rng(1).integers(0, 255, (12, 32, 48, 3),
                                                                                   dtype=np.uint8))
    fp32 = VideoTextPipeline(model, tokenizer).rank_captions(str(video), captions)["ranking"]
    bf16 = VideoTextPipeline(model, tokenizer, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    answer = bf16.rank_captions(str(video), captions)["ranking"]
    np.testing.assert_allclose(sorted(r["similarity"] for r in answer), sorted(r["similarity"] for r in fp32),
                               atol=5e-2)
