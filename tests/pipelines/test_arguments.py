"""Python-API arguments of the pipelines as a user may get them wrong: one str where a list goes, a top-k that is
no positive integer, paths as Path objects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import intern2
from intern2.pipelines.common import items, pipeline_device, positive_count
from intern2.pipelines.image_cls import ImageClassificationPipeline
from intern2.pipelines.tal import TemporalLocalizationPipeline


def test_items_and_counts():
    assert items(("a", Path("b")), "files") == ["a", Path("b")] and items(iter([1]), "x") == [1]
    for one in ("clip.mp4", Path("clip.mp4"), b"x", 5, None):
        with pytest.raises(TypeError, match="files: expected a list, got"):
            items(one, "files")
    assert positive_count(3, "topk") == 3
    for bad in (0, -1, 1.5, True, "3", None):
        with pytest.raises(ValueError, match="topk: expected a positive integer"):
            positive_count(bad, "topk")


def test_image_and_localizer_pipelines_name_their_arguments(tmp_path):
    torch.manual_seed(0)
    model = intern2.create_model("internimage_t", num_classes=3, channels=16, depths=[1, 1, 1, 1],
                                 groups=[1, 2, 4, 8])
    model.pretrained_cfg["input_size"] = (3, 32, 32)
    images = ImageClassificationPipeline(model)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(TypeError, match="files: expected a list, got str"):  # not one "file" per character
        images.predict_files(str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="topk: expected a positive integer, got -1"):
        images(str(tmp_path / "a.png"), topk=-1)
    assert images.predict_files([tmp_path / "a.png"])[0]["file"] == tmp_path / "a.png"
    localizer = TemporalLocalizationPipeline(intern2.create_model(
        "actionformer_thumos14", input_dim=8, num_classes=2, embd_dim=16, fpn_dim=16, head_dim=16))
    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    (result,) = localizer.predict_files([tmp_path / "f.npy"], fps=30.0)  # a Path is a file too
    assert result["file"] == str(tmp_path / "f.npy") and "segments" in result
    with pytest.raises(TypeError, match="files: expected a list, got str"):
        localizer.predict_files(str(tmp_path / "f.npy"), fps=30.0)


def test_a_model_name_and_protocol_options_of_the_wrong_type_are_named():
    with pytest.raises(TypeError, match="create_model: expected a model name such as 'internimage_t', got NoneType"):
        intern2.create_model(None)
    for key, value, least in (("num_classes", -1, 0), ("in_chans", 0, 1)):
        with pytest.raises(ValueError, match=f"{key}: expected an integer >= {least}, got {value}"):
            intern2.create_model("internimage_t", **{key: value})
    model = intern2.create_model("internimage_t", num_classes=3, channels=16, depths=[1, 1, 1, 1],
                                 groups=[1, 2, 4, 8])
    with pytest.raises(ValueError, match=r"options: mean: expected a list of 3 numbers, got \(1, 2\)"):
        ImageClassificationPipeline(model, mean=(1, 2))  # at construction, not at the first image
    with pytest.raises(TypeError, match="unknown image-cls protocol options"):
        ImageClassificationPipeline(model, test_size=(2, 2))


def test_video_text_pipeline_refuses_what_ranks_nothing():
    """Zero-shot among fewer than two labels is always 'certain'; an empty caption is ranked as if it said
    something: both are errors naming the argument (the checks come before any video is read)."""
    from intern2.pipelines.video_text import VideoTextPipeline
    from intern2.text.bpe import BPETokenizer
    tokenizer = BPETokenizer.train(["a cat moves left", "a dog moves right"], vocab_size=300)
    model = intern2.create_model("internvideo_mm_tiny", vocab_size=tokenizer.vocab_size)
    pipeline = VideoTextPipeline(model, tokenizer)
    for labels in ([], ["cat"]):
        with pytest.raises(ValueError, match=f"labels: expected at least two to choose between, got {len(labels)}"):
            pipeline.zero_shot(["clip.mp4"], labels)
    with pytest.raises(ValueError, match=r"captions\[1\]: empty"):
        pipeline.rank_captions("clip.mp4", ["a cat", "  "])
    with pytest.raises(ValueError, match="captions: nothing to rank"):
        pipeline.rank_captions("clip.mp4", [])


def test_a_pipeline_takes_a_device(monkeypatch):
    """``device=`` as in HF pipelines: the model moves there (every pipeline's base takes it, also through
    open_pipeline); a device torch does not have is named."""
    from intern2.pipelines import open_pipeline
    model = intern2.create_model("internimage_t", num_classes=3, channels=16, depths=[1, 1, 1, 1],
                                 groups=[1, 2, 4, 8])
    assert ImageClassificationPipeline(model, device="cpu").device == torch.device("cpu")
    assert open_pipeline(model=model, device=torch.device("cpu")).device.type == "cpu"
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"):
        ImageClassificationPipeline(model, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' asked for, but torch sees no CUDA device"):
            ImageClassificationPipeline(model, device="cuda")
    # A GPU index past the count is named before the model moves (the move failed later with a traceback).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pipeline_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="device: 'cuda:7' asked for, but torch sees only cuda:0$"):
        ImageClassificationPipeline(model, device="cuda:7")


def test_a_pipeline_called_on_a_list_answers_each_input_in_order(tmp_path):
    """As HF pipelines: a list (or tuple) of inputs gives a list of results, the options applied to each."""
    from intern2.pipelines.detect import DetectionPipeline
    from intern2.pipelines.segment import SegmentationPipeline
    torch.manual_seed(0)
    backbone = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8])
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"{seed}.png")
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(paths[-1])
    image = Image.open(paths[1])
    classify = ImageClassificationPipeline(intern2.create_model("internimage_t", num_classes=4, **backbone))
    detect = DetectionPipeline(intern2.create_model("mask_rcnn_internimage_t", backbone=backbone, num_classes=2,
                                                    min_size=64, max_size=96, fpn_channels=32,
                                                    box_detections_per_img=5, box_score_thresh=0.0))
    segment = SegmentationPipeline(intern2.create_model("upernet_internimage_t", num_classes=3, backbone=backbone,
                                                        channels=16, aux_channels=16), test_size=(96, 64))
    for pipeline, options in ((classify, dict(topk=2)), (detect, dict(threshold=0.0)), (segment, {})):
        one_by_one = [pipeline(str(paths[0]), **options), pipeline(image, **options)]
        for inputs in ([str(paths[0]), image], (str(paths[0]), image)):
            together = pipeline(inputs, **options)
            assert isinstance(together, list) and len(together) == 2
            for got, want in zip(together, one_by_one):
                assert got.keys() == want.keys()
                for key in got:
                    same = np.array_equal if isinstance(got[key], np.ndarray) else (lambda a, b: str(a) == str(b))
                    assert same(got[key], want[key]), (type(pipeline).__name__, key)
        assert pipeline([], **options) == []
