"""Weights metadata: every tag builds, names its classes and evaluates with the official protocol; bad metadata is
an error that names the field; heads and input convolutions adapt to the model as timm adapts them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import intern2
from intern2 import cli
from intern2.pipelines.common import load_model
from intern2.pipelines.detect import DetectionPipeline
from intern2.pipelines.image_cls import ImageClassificationPipeline
from intern2.pipelines.segment import SegmentationPipeline, eval_input_size
from intern2.weights import (LABEL_SETS, SegmentationProtocol, get_weights, label_set, labels_from_cfg,
                             list_pretrained, protocol_from_cfg)

TINY = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
TAGS = list_pretrained()


def test_every_family_has_tags_and_list_shows_them(capsys):
    tasks = {get_weights(*name.split(".", 1)).task for name in TAGS}
    assert tasks == {"image-cls", "segment", "detect", "video-cls", "video-pretrain", "video-text", "translation"}
    assert cli.main(["list", "--pretrained", "upernet_internimage_l*"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("upernet_internimage_l.ade20k") and "mIoU 53.9" in line and "54.1" in line
    assert cli.main(["list", "--pretrained", "--json", "internimage_t*"]) == 0
    record = json.loads(capsys.readouterr().out)["internimage_t.in1k"]
    assert record["hf_hub_id"] == "OpenGVLab/InternImage" and record["metrics"][0]["value"] == 83.5


@pytest.mark.parametrize("name", TAGS)
def test_every_tag_builds_names_its_classes_and_keeps_its_protocol(name):
    arch, tag = name.split(".", 1)
    weights = get_weights(arch, tag)
    with torch.device("meta"):
        model = intern2.create_model(name)
    cfg = model.pretrained_cfg
    assert (cfg["architecture"], cfg["tag"], cfg["task"]) == (arch, tag, weights.task)
    assert protocol_from_cfg(json.loads(json.dumps(cfg)), weights.task) == weights.protocol  # survives config.json
    assert weights.file and (weights.hf_hub_id or weights.url)
    if weights.num_classes:
        assert model.num_classes == weights.num_classes
        names = labels_from_cfg(cfg, model.num_classes)
        assert names == list(label_set(weights.labels))
    for metric in weights.metrics:
        assert metric.value > 0 and metric.dataset and metric.source


def test_label_sets_come_in_the_official_order():
    assert label_set("coco")[:3] == ("person", "bicycle", "car") and label_set("coco")[-1] == "toothbrush"
    assert label_set("ade20k")[:3] == ("wall", "building", "sky") and label_set("ade20k")[-2:] == ("clock", "flag")
    assert label_set("kinetics-400")[0] == "abseiling" and label_set("imagenet-1k")[0] == "tench"
    assert label_set("ssv2")[0] == "Approaching something with your camera"
    for name, entry in LABEL_SETS.items():
        assert len(label_set(name)) == entry.size and entry.source


@pytest.mark.parametrize("arch, size", [("upernet_internimage_t", (512, 704)), ("upernet_internimage_s", (512, 704)),
                                        ("upernet_internimage_b", (512, 704)), ("upernet_internimage_l", (640, 864)),
                                        ("upernet_internimage_xl", (640, 864)), ("upernet_internimage_h", (896, 1216))])
def test_segmentation_presets_see_the_official_input_size(arch, size):
    """mmseg: keep-ratio into img_scale, then ResizeToMultiple(32); a 512x683 ADE20K image."""
    protocol = get_weights(arch).protocol
    assert eval_input_size(512, 683, protocol) == size


def test_multi_scale_views_resize_and_round_at_every_ratio():
    t, h = get_weights("upernet_internimage_t").protocol, get_weights("upernet_internimage_h").protocol
    assert eval_input_size(512, 683, t, 0.75) == (384, 512)  # bound (1536, 384)
    assert eval_input_size(512, 683, h, 1.75) == (1568, 2112)  # bound (6272, 1568): 1568 x 2092 -> x32
    assert eval_input_size(512, 683, SegmentationProtocol(size_divisor=None)) == (512, 683)


def test_eval_runs_the_presets_protocol(tmp_path, capsys):
    """`intern2 eval` on an upernet_internimage_l-tagged folder feeds the model 640-short-side inputs."""
    pytest.importorskip("pycocotools")
    from intern2.data.shapes import generate_shapes
    shapes = generate_shapes(tmp_path / "shapes", num_train=1, num_val=2, size=32)
    model = intern2.create_model("upernet_internimage_l", backbone=TINY, channels=16, aux_channels=16,
                                 num_classes=4)
    intern2.save_pretrained(model, tmp_path / "model")
    seen = []
    original = torch.nn.Module.__call__

    def record(self, *args, **kwargs):
        if type(self).__name__ == "UperNet":
            seen.append(tuple(args[0].shape[-2:]))
        return original(self, *args, **kwargs)
    torch.nn.Module.__call__ = record
    try:
        assert cli.main(["eval", "--data", str(shapes), "--checkpoint", str(tmp_path / "model"), "--json"]) == 0
        assert seen == [(640, 640)] * 2  # 32x32 -> 640x640 (keep-ratio bound 2560x640), already x32
        seen.clear()
        assert cli.main(["eval", "--data", str(shapes), "--checkpoint", str(tmp_path / "model"), "--json",
                         "--test-size", "96,64", "--tta"]) == 0
        assert sorted(set(seen)) == [(32, 32), (64, 64), (96, 96), (128, 128)] and len(seen) == 2 * 12
    finally:
        torch.nn.Module.__call__ = original
    # The ADE20K protocol's reduce_zero_label: background (label 0) pixels are ignored.
    assert 0 < json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pixels"] < 2 * 32 * 32


def test_detection_resize_rounds_as_mmdet():
    model = intern2.create_model("mask_rcnn_internimage_t", backbone=TINY, fpn_channels=16).eval()
    for (h, w), want in (((427, 640), (800, 1199)), ((375, 500), (800, 1067)), ((480, 640), (800, 1067))):
        image, _ = model.transform.resize(torch.zeros(3, h, w))
        assert tuple(image.shape[-2:]) == want
    DetectionPipeline(model, test_size=(96, 64))  # the pipeline sets the model's resize bounds
    assert model.transform.min_size == (64,) and model.transform.max_size == 96


def test_image_pipeline_uses_the_tags_preprocessing():
    model = intern2.create_model("internimage_l.in22k_ft_in1k", **TINY, num_classes=1000)
    pipeline = ImageClassificationPipeline(model)
    assert pipeline.protocol.img_size == 384 and pipeline.labels[0] == "tench"
    image = Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8))
    assert tuple(pipeline.transform(image).shape) == (3, 384, 384)


def test_video_tags_carry_the_official_views():
    k400, ssv2 = get_weights("videomae_vit_b", "k400").protocol, get_weights("videomae_vit_b", "ssv2").protocol
    assert (k400.sampling, k400.stride, k400.test_clips, k400.test_crops) == ("dense", 4, 5, 3)
    assert (ssv2.sampling, ssv2.test_clips, ssv2.test_crops) == ("segment", 2, 3)
    mm = get_weights("internvideo_mm_l14").protocol
    assert (mm.sampling, mm.num_frames, mm.short_side, mm.img_size) == ("uniform", 8, 256, 224)
    assert mm.mean[0] == pytest.approx(0.48145466)
    with torch.device("meta"):
        model = intern2.create_model("videomae_vit_b.k400", all_frames=8, img_size=112)
    assert (model.pretrained_cfg["num_frames"], model.pretrained_cfg["img_size"]) == (8, 112)


def test_bad_metadata_names_the_file_and_field(tmp_path):
    model = intern2.create_model("upernet_internimage_t", backbone=TINY, channels=16, aux_channels=16)
    intern2.save_pretrained(model, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    for change, message in ((dict(label_names="mars-rocks"), "label_names: unknown label set 'mars-rocks'"),
                            (dict(test_size="big"), "test_size: expected a list of 2 integers, got 'big'"),
                            (dict(size_divisor=-1), "size_divisor: expected a positive integer"),
                            (dict(label_names=5), "label_names: expected a label set name or a list")):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "config.json").write_text(json.dumps(
            {**config, "pretrained_cfg": {**config["pretrained_cfg"], **change}}))
        (tmp_path / "bad" / "model.safetensors").write_bytes((tmp_path / "model" / "model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=f"{tmp_path / 'bad'}: pretrained_cfg: {message}"):
            SegmentationPipeline.from_pretrained(str(tmp_path / "bad"))
    # Older folders wrote the segmentation bound as test_scale.
    legacy = SegmentationProtocol.from_cfg({"test_scale": [640, 480]})
    assert legacy.test_size == (640, 480)


def test_a_pipeline_given_the_wrong_model_says_what_it_expected(tmp_path, capsys):
    detector = intern2.create_model("mask_rcnn_internimage_t", backbone=TINY, fpn_channels=16)
    with pytest.raises(TypeError, match="ImageClassificationPipeline: expected an image classifier .*got "
                                        "InternImageMaskRCNN \\(mask_rcnn_internimage_t, a detect model\\)"):
        ImageClassificationPipeline(detector)
    intern2.save_pretrained(detector, tmp_path / "det")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(image), "--checkpoint", str(tmp_path / "det"), "--task", "segment"])
    assert exit_info.value.code == 2 and "expected a semantic segmentation model" in capsys.readouterr().err


def test_num_classes_zero_with_weights_gives_the_full_models_pooled_features(tmp_path):
    full = intern2.create_model("internimage_t", **TINY).eval()
    intern2.save_pretrained(full, tmp_path / "full")
    features = intern2.create_model("internimage_t", num_classes=0, checkpoint_path=tmp_path / "full", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(features(x), full.forward_head(full.forward_features(x), pre_logits=True))
    video = dict(depth=1, embed_dim=32, num_heads=2, img_size=32, all_frames=4)
    classifier = intern2.create_model("videomae_vit_s.k400", **video).eval()
    pooled = intern2.create_model("videomae_vit_s", num_classes=0, checkpoint_path=classifier.state_dict(),
                                  **video).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pooled(clip), classifier.forward_head(classifier.forward_features(clip),
                                                                         pre_logits=True))
    # A new head size keeps a fresh head (and says so); the rest is the checkpoint's.
    replaced = intern2.create_model("internimage_t", num_classes=3, checkpoint_path=tmp_path / "full", **TINY)
    assert replaced.num_classes == 3 and torch.equal(replaced.patch_embed.conv1.weight, full.patch_embed.conv1.weight)
    # Without num_classes asked for, another class count is an error, not a random head under the tag's labels.
    intern2.save_pretrained(replaced, tmp_path / "three")
    with pytest.raises(ValueError, match="the checkpoint's classifier has 3 classes, the model's 1000: build the "
                                         "model with num_classes=3"):
        intern2.create_model("internimage_t.in1k", checkpoint_path=tmp_path / "three", **TINY)


def test_in_chans_adapts_the_rgb_stem_as_timm_does():
    rgb = intern2.create_model("internimage_t", **TINY).eval()
    grey = intern2.create_model("internimage_t", in_chans=1, checkpoint_path=rgb.state_dict(), **TINY).eval()
    six = intern2.create_model("internimage_t", in_chans=6, checkpoint_path=rgb.state_dict(), **TINY).eval()
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(image), rgb(image.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(six(image.repeat(1, 6, 1, 1)), rgb(image.repeat(1, 3, 1, 1)), atol=1e-5,
                                   rtol=1e-5)


def test_load_model_reads_a_folder_checkpoint_for_a_named_model(tmp_path):
    """--model NAME --checkpoint FOLDER: the folder's weights (e.g. an HF conversion) go into that model."""
    model = intern2.create_model("videomae_vit_s.k400", depth=1, embed_dim=32, num_heads=2, img_size=32,
                                 all_frames=4)
    intern2.save_pretrained(model, tmp_path / "folder")
    with pytest.raises(ValueError, match="shapes do not match"):  # the registered size, not the folder's config
        load_model(str(tmp_path / "folder"), "videomae_vit_s.k400")
    assert load_model(str(tmp_path / "folder"), None).pretrained_cfg["tag"] == "k400"


def test_label_names_of_another_size_fall_back_to_indices_with_a_warning(caplog):
    """A head replaced after the names were recorded: class indices, and a warning that says why."""
    with caplog.at_level("WARNING", logger="intern2.weights"):
        assert labels_from_cfg({"label_names": ["cat", "dog"]}, 3, "m/config.json") == ["0", "1", "2"]
        assert labels_from_cfg({"label_names": "coco"}, 5) == ["0", "1", "2", "3", "4"]
    assert [r.getMessage() for r in caplog.records] == [
        "m/config.json: label_names has 2 names but the model has 3 classes: classes are named by index",
        "pretrained_cfg: label_names has 80 names but the model has 5 classes: classes are named by index"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="intern2.weights"):
        assert labels_from_cfg({}, 2) == ["0", "1"] and labels_from_cfg({"label_names": ["a", "b"]}, 2) == ["a", "b"]
    assert not caplog.records


def test_a_model_built_unlike_its_tag_carries_only_what_is_its_own():
    """Another class count drops the tag's label names and published scores (timm drops its labels too); another
    resolution scales the tag's test resize with the crop (a 32 px model is not shown frames resized to 224)."""
    tagged = intern2.create_model("internimage_t", **TINY).pretrained_cfg
    assert tagged["label_names"] and tagged["metrics"]
    other = intern2.create_model("internimage_t", num_classes=3, **TINY).pretrained_cfg
    assert "label_names" not in other and "metrics" not in other and other["num_classes"] == 3
    video = intern2.create_model("videomae_vit_s.k400", img_size=32, depth=1, embed_dim=32, num_heads=2,
                                 all_frames=4).pretrained_cfg
    assert video["img_size"] == 32 and video["short_side"] == 32  # k400's test: shorter side to the crop
    clip = intern2.create_model("internvideo_mm_tiny").pretrained_cfg  # the demo's 256 -> 224 ratio at 32 px
    assert clip["img_size"] == 32 and clip["short_side"] == round(256 * 32 / 224)


def test_a_replaced_head_is_saved_as_the_models_own(tmp_path):
    """reset_classifier then save_pretrained: the folder's class count is the new head's, without the old labels."""
    model = intern2.create_model("internimage_t", **TINY)
    model.reset_classifier(5)
    intern2.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_classes"] == saved["pretrained_cfg"]["num_classes"] == 5
    assert "label_names" not in saved["pretrained_cfg"] and "metrics" not in saved["pretrained_cfg"]
    assert intern2.from_pretrained(tmp_path).num_classes == 5


def test_reset_classifier_of_the_same_count_drops_the_tags_labels():
    """A new random head has no class names: after reset_classifier(1000) the ImageNet names would label noise."""
    model = intern2.create_model("internimage_t.in1k", **TINY)
    assert ImageClassificationPipeline(model).labels[0] == "tench"
    model.reset_classifier(1000)
    assert ImageClassificationPipeline(model).labels[:2] == ["0", "1"]
    assert "metrics" not in model.pretrained_cfg and model.pretrained_cfg["architecture"] == "internimage_t"


def test_from_pretrained_with_num_classes_gives_a_new_head(tmp_path):
    """As timm's pretrained=True, num_classes=: the body's weights, a fresh head, none of the old labels."""
    source = intern2.create_model("internimage_t", num_classes=4, **TINY)
    source.pretrained_cfg["label_names"] = ["a", "b", "c", "d"]
    intern2.save_pretrained(source, tmp_path / "m")
    tuned = intern2.from_pretrained(tmp_path / "m", num_classes=3)
    assert tuned.num_classes == 3 and "label_names" not in tuned.pretrained_cfg
    assert torch.equal(tuned.patch_embed.conv1.weight, source.patch_embed.conv1.weight)
    with pytest.raises(ValueError, match="classifier has 4 classes"):  # unasked, a mismatch stays an error
        intern2.load_checkpoint(intern2.create_model("internimage_t", num_classes=3, **TINY), tmp_path / "m",
                                allow_new_head=False)


@pytest.mark.parametrize("wrap", [torch.compile, torch.nn.DataParallel], ids=["compiled", "data-parallel"])
def test_a_wrapped_model_is_saved_as_the_model_it_wraps(tmp_path, wrap):
    model = intern2.create_model("internimage_t", num_classes=3, **TINY).eval()
    intern2.save_pretrained(wrap(model), tmp_path / "m")  # its keys had _orig_mod. / module. prefixes
    loaded = intern2.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_open_pipeline_takes_a_built_model_and_pretrained(tmp_path, monkeypatch, caplog):
    from intern2.pipelines import open_pipeline
    model = intern2.create_model("internimage_t", num_classes=3, **TINY)
    assert open_pipeline(model=model).model is model  # a model already built, as transformers' pipeline
    with pytest.raises(ValueError, match="model= is a built model"):
        open_pipeline(model=model, pretrained=True)
    with pytest.raises(ValueError, match="model= is required unless checkpoint= is a model folder"):
        open_pipeline()  # the Python arguments, not the CLI's flags
    with pytest.raises(KeyError, match="no_such_model"):  # a typo is its own error, before any weights warning
        open_pipeline(model="no_such_model")
    assert "random weights" not in caplog.text
    # pretrained=True resolves the tag's official file (here: missing from an empty cache, offline).
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="hf download OpenGVLab/InternImage internimage_t_1k_224.pth"):
        open_pipeline(model="internimage_t.in1k", pretrained=True)


def test_a_grey_model_gets_grey_images():
    """in_chans=1 (the stem's RGB filters summed): the pipeline gives it the grey image, not an RGB tensor."""
    model = intern2.create_model("internimage_t.in1k", in_chans=1, **TINY)
    pipeline = ImageClassificationPipeline(model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    assert pipeline.transform(image).shape == (1, 224, 224)
    top = pipeline(image, topk=2)["top"]
    assert len(top) == 2 and top[0]["label"] in pipeline.labels


def test_from_pretrained_of_a_name_says_what_loads_it():
    with pytest.raises(FileNotFoundError, match=r"is a model name: intern2.create_model\('internimage_t.in1k', "
                                                r"pretrained=True\)"):
        intern2.from_pretrained("internimage_t.in1k")
    # A Hub repo is read from the cache (offline in tests): the error says what to fetch.
    with pytest.raises(FileNotFoundError, match=r"read as a Hub repo\): .* is not in the Hugging Face cache .* fetch "
                                                r"it with `hf download OpenGVLab/internimage_t_1k_224"):
        intern2.from_pretrained("OpenGVLab/internimage_t_1k_224")


def test_a_bfloat16_folder_comes_back_in_bfloat16(tmp_path):
    model = intern2.create_model("internimage_t", num_classes=3, **TINY).to(torch.bfloat16)
    intern2.save_pretrained(model, tmp_path / "m")
    loaded = intern2.from_pretrained(tmp_path / "m")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert next(intern2.from_pretrained(tmp_path / "m", dtype=torch.float32).parameters()).dtype == torch.float32
