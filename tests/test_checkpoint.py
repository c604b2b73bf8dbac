"""Checkpoint layouts in (official .pth, mmcv, HF-hub folders), safe unpickling, save/load round trips."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import intern2
from intern2.checkpoint import read_checkpoint

TINY = dict(channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8), num_classes=7, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = intern2.create_model("internimage_t", **TINY).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _same_outputs(a, b):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


def _fresh():
    return intern2.create_model("internimage_t", **TINY)


def test_official_classification_pth_with_yacs_config(reference, tmp_path):
    yacs = pytest.importorskip("yacs.config")
    cfg = yacs.CfgNode()
    cfg.MODEL = yacs.CfgNode()
    cfg.MODEL.TYPE = "intern_image"
    cfg.MODEL.INTERN_IMAGE = yacs.CfgNode()
    cfg.MODEL.INTERN_IMAGE.DEPTHS = [1, 1, 1, 1]
    cfg.freeze()
    path = tmp_path / "internimage_t_1k_224.pth"
    torch.save({"model": reference.state_dict(), "optimizer": {"state": {}}, "epoch": 299, "config": cfg,
                "max_accuracy": 83.5}, path)
    model = intern2.create_model("internimage_t", checkpoint_path=path, **TINY)
    _same_outputs(model, reference)


@pytest.mark.parametrize("wrap", ["bare", "module", "ddp_prefix"])
def test_other_classification_layouts(reference, tmp_path, wrap):
    state = reference.state_dict()
    obj = {"bare": state, "module": {"module": state},
           "ddp_prefix": {"model": {f"module.{k}": v for k, v in state.items()}}}[wrap]
    torch.save(obj, tmp_path / "ckpt.pth")
    model = _fresh()
    intern2.load_checkpoint(model, tmp_path / "ckpt.pth")
    _same_outputs(model, reference)


def test_mmdet_checkpoint_into_backbone(reference, tmp_path):
    state = {f"backbone.{k}": v for k, v in reference.state_dict().items()}
    state.update({"neck.lateral_convs.0.conv.weight": torch.zeros(256, 16, 1, 1),
                  "rpn_head.rpn_cls.bias": torch.zeros(3)})
    torch.save({"state_dict": state, "meta": {"epoch": 12, "mmdet_version": "2.28.1"}}, tmp_path / "mask_rcnn.pth")
    backbone = intern2.create_model("internimage_t", **TINY, features_only=True,
                                    checkpoint_path=tmp_path / "mask_rcnn.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(backbone(x), reference.eval().forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_hf_hub_folder(reference, tmp_path):
    config = {"architectures": ["InternImageModelForImageClassification"], "model_type": "internimage",
              "auto_map": {"AutoConfig": "configuration_internimage.InternImageConfig"}, "core_op": "DCNv3",
              "torch_dtype": "float32", **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({f"model.{k}": v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = intern2.from_pretrained(tmp_path)
    _same_outputs(loaded, reference)
    intern2.save_pretrained(loaded, tmp_path / "saved")  # re-saved in intern2's layout, it loads back
    _same_outputs(intern2.from_pretrained(tmp_path / "saved"), reference)


def test_hf_hub_folder_gets_the_published_tag_of_its_shape_only(tmp_path):
    """An HF InternImage folder of T's width, depth and 1000 classes is T's in1k record (metrics, ImageNet names);
    another class count or a width of no variant gets no tag's record: no published metrics, file or names."""
    t_shape = dict(channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32])
    for i, (fields, tag) in enumerate(((dict(t_shape, num_classes=1000), "in1k"), (dict(t_shape, num_classes=10), None),
                                       (dict(TINY, num_classes=1000), None))):
        folder = tmp_path / str(i)
        folder.mkdir()
        config = {"model_type": "internimage", "core_op": "DCNv3",
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}
        (folder / "config.json").write_text(json.dumps(config))
        cfg = intern2.from_pretrained(folder, weights=False).pretrained_cfg
        assert cfg.get("tag") == tag and cfg["num_classes"] == fields["num_classes"] and cfg["file"] == str(folder)
        assert ("metrics" in cfg) == ("hf_hub_filename" in cfg) == (tag is not None)
        assert ("label_names" in cfg) == (fields["num_classes"] == 1000)


# OpenGVLab/internimage_t_1k_224's config.json as published (classification/huggingface/in1k_model/), less the
# remote-code entries (_name_or_path, auto_map).
OFFICIAL_HF_T = {
    "act_layer": "GELU", "architectures": ["InternImageModel"], "center_feature_scale": False, "channels": 64,
    "cls_scale": 1.5, "core_op": "DCNv3", "depths": [4, 4, 18, 4], "drop_path_rate": 0.0, "drop_path_type": "linear",
    "drop_rate": 0.0, "dw_kernel_size": None, "groups": [4, 8, 16, 32], "layer_scale": None,
    "level2_post_norm": False, "level2_post_norm_block_ids": None, "mlp_ratio": 4.0, "model_type": "internimage",
    "norm_layer": "LN", "num_classes": 1000, "offset_scale": 1.0, "post_norm": False, "remove_center": False,
    "res_post_norm": False, "torch_dtype": "float32", "transformers_version": "4.37.2", "use_clip_projector": False,
    "with_cp": False}


def test_official_hf_config_is_the_published_tag(tmp_path):
    """OpenGVLab's published HF config (model_type 'internimage', no id2label) is T's in1k record, and the CLI
    reads the folder as an image classifier."""
    from intern2.pipelines.common import task_of_arguments
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_HF_T))
    model = intern2.from_pretrained(tmp_path, weights=False)
    assert model.pretrained_cfg["tag"] == "in1k" and model.pretrained_cfg["metrics"]
    assert intern2.create_model("internimage_t", drop_path_rate=0.0).config == model.config
    assert task_of_arguments(["--checkpoint", str(tmp_path)]) == "image-cls"


@pytest.mark.parametrize("id2label, published", [
    ({str(i): f"dish {i}" for i in range(1000)}, False),  # a fine-tune on 1000 other classes
    ({str(i): f"LABEL_{i}" for i in range(1000)}, True),  # transformers' placeholders name nothing
    ({"0": "LABEL_0", "1": "LABEL_1"}, True),  # transformers' 2-class default, in a config of 1000 classes
])
def test_hf_folder_id2label(tmp_path, id2label, published):
    """A folder whose id2label names its classes is someone's fine-tune: its names, no published metrics."""
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_HF_T, "id2label": id2label}))
    cfg = intern2.from_pretrained(tmp_path, weights=False).pretrained_cfg
    assert ("metrics" in cfg) == ("tag" in cfg) == published
    names = intern2.weights.labels_from_cfg(cfg, 1000)
    assert (names[1] == "goldfish" if published else names[1] == "dish 1"), names[1]


def test_hf_folder_bad_id2label(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_HF_T, "id2label": {"1": "a", "2": "b"}}))
    with pytest.raises(ValueError, match=r"config\.json: id2label: key '2': expected the class indices 0\.\.1$"):
        intern2.from_pretrained(tmp_path, weights=False)


def test_hf_label_names():
    """id2label as JSON writes it (string keys) or as PretrainedConfig.to_dict keeps it (int keys); anything else
    is one line naming the key or value."""
    from intern2.weights import hf_label_names
    assert hf_label_names({"id2label": {"1": "dog", "0": "cat"}}) == ["cat", "dog"]
    assert hf_label_names({"id2label": {1: "dog", 0: "cat"}}) == ["cat", "dog"]
    assert hf_label_names({}) is None and hf_label_names({"id2label": {}}) is None
    for id2label, message in ((["cat"], "expected an object mapping class indices to names, got list"),
                              ({"0": "cat", "01": "dog"}, "key '01': expected the class indices 0..1"),
                              ({"0": "cat", "1": 7}, "'1': expected a class name, got 7"),
                              ({True: "cat", "1": "dog"}, "key True: expected the class indices 0..1"),
                              ({0: "cat", "0": "dog"}, "an index given twice")):
        with pytest.raises(ValueError, match=f"^id2label: {re.escape(message)}"):
            hf_label_names({"id2label": id2label})


def test_hf_folder_without_a_tag_takes_its_preprocessor_config(tmp_path):
    """A folder no tag describes (H/G's 22K heads, a fine-tune) is evaluated as its preprocessor_config.json says
    (transformers' CLIP-style processor: shorter side to `size`, centre crop `crop_size`); a tag's own protocol
    wins where there is one (OpenGVLab's processors state the tags' protocols)."""
    from intern2.pipelines.image_cls import ImageClassificationPipeline
    processor = {"crop_size": 256, "size": {"shortest_edge": 292}, "resample": 2, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.25, 0.25, 0.25], "do_center_crop": True}
    for classes, want in ((10, dict(input_size=[3, 256, 256], crop_pct=256 / 292, interpolation="bilinear",
                                    mean=[0.5] * 3, std=[0.25] * 3)),
                          (1000, dict(input_size=[3, 224, 224], crop_pct=1.0, interpolation="bicubic"))):
        folder = tmp_path / str(classes)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**OFFICIAL_HF_T, "num_classes": classes}))
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
        model = intern2.from_pretrained(folder, weights=False)
        assert {k: model.pretrained_cfg[k] for k in want} == want
        assert ImageClassificationPipeline(model).protocol.input_size[-1] == want["input_size"][-1]
    (folder / "config.json").write_text(json.dumps({**OFFICIAL_HF_T, "num_classes": 10}))
    # No crop (or none done): the resized shorter side is the input; sizes it cannot read leave the defaults.
    for other, size in (({"size": {"shortest_edge": 300}}, 300), ({"size": 320, "crop_size": 288,
                                                                   "do_center_crop": False}, 320),
                        ({"size": "large"}, 224)):
        (folder / "preprocessor_config.json").write_text(json.dumps(other))
        cfg = intern2.from_pretrained(folder, weights=False).pretrained_cfg
        assert (cfg["input_size"][-1], cfg["crop_pct"]) == (size, 1.0), other
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "resample": 7}))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: resample: expected one of PIL's codes"):
        intern2.from_pretrained(folder, weights=False)


def test_save_pretrained_round_trip(reference, tmp_path):
    reference.pretrained_cfg = _fresh().pretrained_cfg
    intern2.save_pretrained(reference, tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "model.safetensors"]
    loaded = intern2.from_pretrained(tmp_path / "saved")
    assert loaded.config == reference.config
    for (k, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    _same_outputs(loaded, reference)


def test_a_failed_save_keeps_the_old_pair(reference, tmp_path, monkeypatch):
    """Both files are written before either replaces the old one: a save that fails midway (disk full, Ctrl-C)
    leaves the old config with the old weights."""
    import safetensors.torch
    reference.pretrained_cfg = _fresh().pretrained_cfg
    intern2.save_pretrained(reference, tmp_path / "saved")
    before = {name: (tmp_path / "saved" / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    class Interrupted:  # the config's write fails: the weights must not have replaced the old ones yet
        @staticmethod
        def dumps(*args, **kwargs):
            raise KeyboardInterrupt
    other = intern2.create_model("internimage_t", num_classes=5, channels=16, depths=[1, 1, 1, 1],
                                 groups=[1, 2, 4, 8])
    for target, replacement, error in ((safetensors.torch, ("save_file", disk_full), OSError),
                                       (intern2.checkpoint, ("json", Interrupted), KeyboardInterrupt)):
        with monkeypatch.context() as patch:
            patch.setattr(target, *replacement)
            with pytest.raises(error):
                intern2.save_pretrained(other, tmp_path / "saved")
        assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "model.safetensors"]  # no temp file left
        assert {name: (tmp_path / "saved" / name).read_bytes() for name in before} == before


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "payload": Exploit()}, path)
    with pytest.raises(ValueError, match=f"cannot read checkpoint {path}.*weights_only=True"):
        intern2.load_checkpoint(_fresh(), path)
    assert not marker.exists()


def test_replaced_head_is_logged_and_fresh(reference, caplog):
    model = intern2.create_model("internimage_t", **{**TINY, "num_classes": 3})
    fresh_head = model.head.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="intern2.checkpoint"):
        intern2.load_checkpoint(model, reference.state_dict())
    assert "keeping a freshly initialised head" in caplog.text
    assert torch.equal(model.head.weight, fresh_head)
    assert torch.equal(model.patch_embed.conv1.weight, reference.patch_embed.conv1.weight)


def test_mismatches_are_clear_errors(reference, tmp_path):
    state = dict(reference.state_dict())
    state["patch_embed.conv1.weight"] = torch.zeros(8, 3, 5, 5)
    message = r"patch_embed.conv1.weight: checkpoint \(8, 3, 5, 5\) vs model \(8, 3, 3, 3\)"
    with pytest.raises(ValueError, match=message):
        intern2.load_checkpoint(_fresh(), state)
    partial = {k: v for k, v in reference.state_dict().items() if not k.startswith("levels.3.")}
    with pytest.raises(ValueError, match="missing keys"):
        intern2.load_checkpoint(_fresh(), partial)
    result = intern2.load_checkpoint(_fresh(), partial, strict=False)
    assert any(k.startswith("levels.3.") for k in result.missing_keys)
    with pytest.raises(ValueError, match="no weights found"):
        read_checkpoint({"epoch": 3, "optimizer": {"x": 1}})


@pytest.mark.parametrize("name,content", [("junk.pth", b"not a checkpoint at all"),
                                          ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad"),
                                          ("junk.txt", b"hello")])
def test_corrupt_files_name_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")


def test_pretrained_reads_intern2_home_or_an_explicit_file(reference, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="internimage_t_1k_224.pth of OpenGVLab/InternImage is not in the "
                                                "Hugging Face cache .* HF_HUB_OFFLINE=1"):
        intern2.create_model("internimage_t", pretrained=True, **TINY)
    torch.save({"model": reference.state_dict()}, tmp_path / "internimage_t_1k_224.pth")
    _same_outputs(intern2.create_model("internimage_t", pretrained=True, **TINY), reference)
    other = tmp_path / "elsewhere.pth"
    torch.save(reference.state_dict(), other)
    model = intern2.create_model("internimage_t.in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(other)),
                                 **TINY)
    _same_outputs(model, reference)
    assert model.pretrained_cfg["crop_pct"] == 1.0 and model.pretrained_cfg["interpolation"] == "bicubic"
    with pytest.raises(FileNotFoundError, match=f"pretrained_cfg_overlay file {tmp_path / 'nope.pth'}: no such file"):
        intern2.create_model("internimage_t.in1k", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")), **TINY)


@pytest.mark.parametrize("order", ["intern2_first", "timm_first"])
def test_timm_registration(order, tmp_path, reference):
    pytest.importorskip("timm")
    path = tmp_path / "w.pth"
    torch.save({"model": reference.state_dict()}, path)
    imports = "import intern2; import timm" if order == "intern2_first" else "import timm; import intern2"
    script = (f"{imports}\nimport torch\n"
              f"m = timm.create_model('internimage_t', pretrained=True, "
              f"pretrained_cfg_overlay=dict(file={str(path)!r}),"
              f" channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8), num_classes=7)\n"
              f"print(type(m).__name__, m.num_classes, 'internimage_t' in timm.list_models('internimage*'))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["InternImage", "7", "True"]
