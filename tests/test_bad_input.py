"""Bad and careless input through the command line (in-process, as a user runs it): each case ends in exit code 2
and one line on stderr that names the culprit, with no traceback; --debug shows the traceback."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import intern2
from intern2 import cli

TINY = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
TRAIN = ["train", "image-cls", "--data", "builtin:digits", "--set", "img_size=32", "--set", "train.max_steps=1",
         "--set", "train.batch_size=4",
         "--set", "model_args={channels: 16, depths: [1, 1, 1, 1], groups: [1, 2, 4, 8]}"]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    image = root / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    model = intern2.create_model("internimage_t", num_classes=3, **TINY)
    intern2.save_pretrained(model, root / "good")
    config = json.loads((root / "good" / "config.json").read_text())
    weights = (root / "good" / "model.safetensors").read_bytes()

    def folder(name, change):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(change(dict(config))))
        (root / name / "model.safetensors").write_bytes(weights)
        return str(root / name)
    with open(root / "evil.pth", "wb") as handle:
        pickle.dump({"model": _Evil()}, handle, protocol=2)  # torch.save's protocol
    (root / "not_a_dir").write_text("x")
    (root / "clip.mp4").write_bytes(b"never decoded: the options are refused first")
    (root / "dup").mkdir()  # files whose names clash with a.png / clip.mp4 in an output folder
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "dup" / "a.png")
    (root / "dup" / "clip.mp4").write_bytes(b"never decoded either")
    torch.save([1, 2, 3], root / "list.pth")
    torch.save(model.state_dict(), root / "weights.pth")  # weights, not a training checkpoint
    (root / "only_bad" / "0").mkdir(parents=True)
    (root / "only_bad" / "0" / "broken.png").write_bytes(b"not a png")
    for label in ("a", "b"):  # enough images for a batch, none readable
        (root / "all_bad" / label).mkdir(parents=True)
        for i in range(4):
            (root / "all_bad" / label / f"{i}.png").write_bytes(b"not a png")
    (root / "val_bad" / "0").mkdir(parents=True)  # a validation folder of the digits' class "0", unreadable
    for i in range(2):
        (root / "val_bad" / "0" / f"{i}.png").write_bytes(b"not a png")
    (root / "junk.pth").write_text("hello, not a pickle")
    (root / "page.pth").write_text("<html>404 Not Found</html>")  # what a failed download may leave
    (root / "one_image" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "one_image" / "cat" / "a.png")
    wide = intern2.create_model("internimage_t", num_classes=3, **{**TINY, "channels": 32})
    intern2.save_pretrained(wide, root / "wide")
    intern2.save_pretrained(intern2.create_model("internimage_t", features_only=True, **TINY), root / "backbone")
    intern2.save_pretrained(intern2.create_model("internimage_t", num_classes=0, **TINY), root / "headless")
    intern2.save_pretrained(intern2.create_model("upernet_internimage_t", num_classes=4, backbone=TINY, channels=16,
                                                 aux_channels=16), root / "seg")
    (Path(folder("deep_config", lambda c: c)) / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (Path(folder("wrong_shapes", lambda c: c)) / "model.safetensors").write_bytes(
        (root / "wide" / "model.safetensors").read_bytes())  # a 32-channel model's tensors, a 16-channel config
    return {"image": str(image), "good": str(root / "good"), "root": root, "deep_config": str(root / "deep_config"),
            "wrong_shapes": str(root / "wrong_shapes"), "wide": str(root / "wide"), "seg": str(root / "seg"),
            "list_config": folder("list_config", lambda c: [1, 2]),
            "string_cfg": folder("string_cfg", lambda c: {**c, "pretrained_cfg": "x"}),
            "bad_channels": folder("bad_channels", lambda c: {**c, "channels": "sixteen"}),
            "negative": folder("negative", lambda c: {**c, "channels": -16}),
            "zero_std": folder("zero_std", lambda c: {**c, "pretrained_cfg": {**c["pretrained_cfg"],
                                                                             "std": [0, 0, 0]}}),
            "unknown_labels": folder("unknown_labels", lambda c: {**c, "pretrained_cfg": {
                **c["pretrained_cfg"], "label_names": "imagenet-5k"}})}


CASES = [
    # (id, argv with {placeholders}, text the one line must contain)
    ("lr", TRAIN + ["--set", "train.lr=-1"], "train.lr: expected a positive number, got -1"),
    ("epochs", TRAIN + ["--set", "train.epochs=ten"], "train.epochs: expected integer, got 'ten'"),
    ("train-section", TRAIN + ["--set", "train=5"], "train: expected a mapping of TrainConfig fields, got 5"),
    ("img-size", TRAIN + ["--set", "img_size=0"], "img_size: expected positive values, got 0"),
    ("workers", TRAIN + ["--set", "train.num_workers=-1"], "train.num_workers: expected a number >= 0"),
    ("device", TRAIN + ["--set", "train.device=tpu9"], "train.device: expected 'auto', 'cpu', 'cuda'"),
    ("model", TRAIN + ["--model", "resnet50"], "unknown model 'resnet50'"),
    ("model-args", TRAIN + ["--set", "model_args={bogus: 1}"], "unknown config keys ['bogus']"),
    ("checkpoint", TRAIN + ["--set", "checkpoint=/nope.pth"], "checkpoint /nope.pth does not exist"),
    ("resume", TRAIN + ["--set", "train.resume=/nope.pt"], "/nope.pt"),
    ("evil-checkpoint", TRAIN + ["--set", "checkpoint={root}/evil.pth"], "evil.pth: Unsupported global: GLOBAL print"),
    ("junk-checkpoint", ["predict", "{image}", "--model", "internimage_t", "--checkpoint", "{root}/junk.pth"],
     "junk.pth: KeyError: 101 (a damaged or truncated file, or not a PyTorch checkpoint?)"),
    ("html-checkpoint", ["predict", "{image}", "--model", "internimage_t", "--checkpoint", "{root}/page.pth"],
     "page.pth: not a pickle (a damaged or truncated file, or not a PyTorch checkpoint?)"),
    ("out-is-a-file", TRAIN + ["--out", "{root}/not_a_dir"], "not_a_dir"),
    ("topk", ["predict", "{image}", "--checkpoint", "{good}", "--topk", "0"],
     "argument --topk: expected a positive int, got '0'"),
    ("missing-folder", ["predict", "{image}", "--checkpoint", "{root}/nowhere"], "nowhere: no such file or folder"),
    ("wrong-task", ["predict", "{image}", "--checkpoint", "{good}", "--task", "segment"],
     "expected a semantic segmentation model"),
    ("wrong-task-video", ["predict", "{image}", "--checkpoint", "{good}", "--task", "video-cls"],
     "expected a video ViT"),
    ("config-list", ["predict", "{image}", "--checkpoint", "{list_config}"], "expected a JSON object, got list"),
    ("config-pretrained-cfg", ["predict", "{image}", "--checkpoint", "{string_cfg}"],
     "pretrained_cfg: expected a JSON object"),
    ("config-channels", ["predict", "{image}", "--checkpoint", "{bad_channels}"],
     "channels: expected integer, got 'sixteen'"),
    ("config-negative", ["predict", "{image}", "--checkpoint", "{negative}"], "expected positive integers"),
    ("config-labels", ["predict", "{image}", "--checkpoint", "{unknown_labels}"],
     "label_names: unknown label set 'imagenet-5k'"),
    ("config-zero-std", ["predict", "{image}", "--checkpoint", "{zero_std}"],
     "pretrained_cfg: std: expected positive numbers, got [0.0, 0.0, 0.0]"),
    ("eval-data", ["eval", "--data", "{root}/nowhere", "--checkpoint", "{good}"], "nowhere: no such file"),
    ("unknown-tag", ["predict", "{image}", "--model", "internimage_t.in21k"], "unknown pretrained tag 'in21k'"),
    ("translate-batch", ["translate", "--src", "en", "--tgt", "fr", "--batch-size", "0", "hi"], "--batch-size 0"),
    ("translate-language", ["translate", "--src", "klingonx", "--tgt", "fr", "hi"],
     "--src: unknown language 'klingonx'"),
    ("serve-port", ["serve", "--port", "-1"], "expected a port number 0-65535"),
    ("resume-list", TRAIN + ["--set", "train.resume={root}/list.pth"], "list.pth is not a training checkpoint"),
    ("resume-weights", TRAIN + ["--set", "train.resume={root}/weights.pth"],
     "weights.pth is not a training checkpoint"),
    ("video-model-for-images", TRAIN[:4] + ["--model", "videomae_vit_s", "--set", "img_size=32"],
     "model 'videomae_vit_s' is a video-cls model, not image-cls"),
    ("model-args-string", TRAIN + ["--set", "model_args=hello"], "model_args: expected a mapping"),
    ("lr-nan", TRAIN + ["--set", "train.lr=.nan"], "train.lr: expected a positive number, got nan"),
    ("max-steps-0", TRAIN + ["--set", "train.max_steps=0"], "train.max_steps: expected a positive integer, got 0"),
    ("time-limit", TRAIN + ["--set", "train.time_limit_s=-1"], "train.time_limit_s: expected a number >= 0"),
    ("clip-grad", TRAIN + ["--set", "train.clip_grad=-1"], "train.clip_grad: expected a positive number"),
    ("out-unwritable", TRAIN + ["--out", "/proc/intern2_run"], "/proc/intern2_run"),
    ("too-few-samples", TRAIN + ["--data", "{root}/one_image"], "larger than the 1 training samples"),
    ("train-nothing-readable", TRAIN + ["--data", "{root}/all_bad", "--out", "{root}/all_bad_run"],
     "training data: all 4 samples drawn were unreadable and skipped, so nothing was learned"),
    ("config-not-yaml", ["train", "image-cls", "--config", "{image}"], "a.png: not a readable YAML file"),
    ("device-unknown", ["predict", "{image}", "--checkpoint", "{good}", "--device", "gpu0"],
     "--device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
    ("translate-int8-on-gpu", ["translate", "--src", "en", "--tgt", "fr", "--int8", "--device", "cuda:0", "Hi"],
     "--device: 'cuda:0' asked for, but torch sees no CUDA device" if not torch.cuda.is_available() else
     "--int8 and --device cuda:0: int8 layers run on the CPU only"),
    ("topk-negative", ["predict", "{image}", "--checkpoint", "{good}", "--topk", "-3"],
     "argument --topk: expected a positive int, got '-3'"),
    ("config-deep", ["predict", "{image}", "--checkpoint", "{deep_config}"], "config.json: nested too deeply"),
    ("folder-wrong-shapes", ["predict", "{image}", "--checkpoint", "{wrong_shapes}"],
     "wrong_shapes: 103 tensor shapes do not match the model"),
    ("predict-out-is-a-file", ["predict", "{image}", "--checkpoint", "{seg}", "--out", "{root}/not_a_dir"],
     "not_a_dir"),
    ("export-out-is-a-folder", ["export", "onnx", "--checkpoint", "{good}", "--out", "{root}"],
     "--out {root}: is a folder; expected a file"),
    ("convert-out-is-a-file", ["convert", "--model", "internimage_t", "--checkpoint", "{root}/weights.pth", "--out",
                               "{root}/not_a_dir"], "not_a_dir"),
    ("translate-output-is-a-folder", ["translate", "--src", "en", "--tgt", "fr", "--output", "{root}", "hi"],
     "--output"),
    ("serve-upload-limit", ["serve", "--max-upload-mb", "-5"], "--max-upload-mb: expected a positive float, got '-5'"),
    ("serve-missing-model", ["serve", "--image-model", "/nope"], "/nope: no such file or folder"),
    ("resume-other-widths", TRAIN + ["--set", "checkpoint={wide}"], "wide"),
    ("eval-digits-other-classes", ["eval", "--data", "builtin:digits", "--checkpoint", "{good}"],
     "data builtin:digits: its 10 classes"),
    ("eval-nothing-readable", ["eval", "--data", "{root}/only_bad", "--checkpoint", "{good}"],
     "no readable images (1 unreadable)"),
    ("serve-upload-limit-inf", ["serve", "--max-upload-mb", "inf"], "expected a positive float, got 'inf'"),
    ("serve-spec-no-weights", ["serve", "--image-model", "internimage_t:"], "internimage_t:: nothing after ':'"),
    ("serve-unknown-model-unquoted", ["serve", "--image-model", "nosuch"], "serve: error: unknown model 'nosuch'"),
    ("convert-out-empty", ["convert", "--model", "internimage_t", "--checkpoint", "{root}/weights.pth", "--out", ""],
     "--out: empty path"),
    ("zero-shot-labels-file-missing", ["zero-shot", "{root}/clip.mp4", "--labels-file", "{root}/nope.txt"],
     "--labels-file {root}/nope.txt: cannot read it (No such file or directory)"),
    ("zero-shot-labels-twice", ["zero-shot", "{root}/clip.mp4", "--labels", "a,b", "--labels-file", "{root}/x.txt"],
     "--labels and --labels-file: give the class names one way"),
    ("zero-shot-two-fields", ["zero-shot", "{image}", "--prompt", "{} and {}", "--labels", "a,b"],
     "--prompt '{} and {}': expected one '{}' where the label goes, found 2 fields"),
    # a protocol option's error names the flag the user typed, not the protocol field behind it
    ("seg-slide-stride-flag", ["predict", "{image}", "--checkpoint", "{seg}", "--slide-stride", "4,4"],
     "predict: error: --slide-stride: needs --slide"),
    ("video-clips-flag", ["predict", "{root}/clip.mp4", "--model", "videomae_vit_s", "--sampling", "uniform",
                          "--clips", "4"], "--clips: expected 1 with --sampling 'uniform' (one view per video), got 4"),
    ("export-opset-99", ["export", "onnx", "--checkpoint", "{good}", "--out", "{root}/m.onnx", "--opset", "99"],
     "--opset 99: expected 17 to "),
    ("export-img-size-0", ["export", "onnx", "--checkpoint", "{good}", "--out", "{root}/m.onnx", "--img-size", "0"],
     "--img-size 0: expected a positive number of pixels, at most 8192"),
    ("size-divisor-huge", ["predict", "{image}", "--checkpoint", "{seg}", "--size-divisor", "100000"],
     "predict: error: --size-divisor: expected at most 8192 pixels, got 100000"),
    ("set-yaml-one-line", TRAIN + ["--set", "img_size=[1"], "--set 'img_size=[1': value is not valid YAML (expected "
     "',' or ']', but got '<stream end>' at line 1, column 3)"),
    ("eval-csv-not-text", ["eval", "--data", "{image}", "--checkpoint", "{good}"], "not a UTF-8 CSV of 'path,label'"),
    ("detector-threshold", ["predict", "{image}", "--model", "mask_rcnn_internimage_t", "--threshold", "2"],
     "--threshold 2.0: expected a score in [0, 1]"),
    # training values checked before the run (not after it, at the evaluation or the save)
    ("crop-pct", TRAIN + ["--set", "crop_pct=5"], "crop_pct: expected a number in (0, 1], got 5"),
    ("crop-scale-inverted", TRAIN + ["--set", "train_crop_scale=[1, 0.5]"],
     "train_crop_scale: expected a (low, high) pair with low <= high, both in (0, 1], got [1.0, 0.5]"),
    ("hflip", TRAIN + ["--set", "hflip=2"], "hflip: expected a number in [0, 1], got 2"),
    ("ema-decay-1", TRAIN + ["--set", "train.ema_decay=1.0"], "train.ema_decay: expected a number in [0, 1), got 1.0"),
    ("model-args-num-classes", TRAIN + ["--set", "model_args.num_classes=3"],
     "model_args.num_classes: 3, but data builtin:digits has 10 classes"),
    ("video-label-smoothing", ["train", "video-cls", "--set", "label_smoothing=5"],
     "label_smoothing: expected a number in [0, 1), got 5"),
    ("video-std-zero", ["train", "video-cls", "--set", "std=[0, 0, 0]"], "std: expected values in (0, inf), got [0"),
    ("video-train-scale", ["train", "video-cls", "--set", "train_scale=[1, 0.2]"], "train_scale: expected a (low"),
    ("translation-eval-beams", ["train", "translation", "--set", "eval_beams=0"], "eval_beams: expected positive"),
    ("translation-eval-batch", ["train", "translation", "--set", "eval_batch_size=0"], "eval_batch_size: expected"),
    ("translation-label-smoothing", ["train", "translation", "--set", "label_smoothing=5"],
     "label_smoothing: expected a number in [0, 1), got 5"),
    ("detect-min-over-max", ["train", "detect", "--set", "min_size=900", "--set", "max_size=800"],
     "min_size: expected at most max_size (800), got 900"),
    ("detect-hflip", ["train", "detect", "--set", "hflip=-1"], "hflip: expected a number in [0, 1], got -1"),
    ("segment-ratio-range", ["train", "segment", "--set", "ratio_range=[2, 0.5]"], "ratio_range: expected a (low"),
    ("segment-aux-weight", ["train", "segment", "--set", "aux_weight=-1"], "aux_weight: expected a number in [0, inf)"),
    ("tal-trunc-thresh", ["train", "tal", "--set", "trunc_thresh=2"],
     "trunc_thresh: expected a number in [0, 1], got 2"),
    ("layer-decay-without-layers", ["train", "detect", "--set", "train.layer_decay=0.9", "--set", "train.max_steps=1",
                                    "--set", "model_args={backbone: {channels: 16, depths: [1, 1, 1, 1], "
                                    "groups: [1, 2, 4, 8]}}", "--set", "min_size=64", "--set", "max_size=64"],
     "train.layer_decay: InternImageMaskRCNN has no layer depths to decay over"),
    ("data-empty", TRAIN + ["--data", ""], "--data: empty"),
    ("train-without-task", ["train"], "intern2 train: error: expected a task"),
    ("demo-budget-inf", ["demo", "--budget", "inf"], "--budget: expected a number in (0, 1000], got inf"),
    ("eval-batch-size-0", ["eval", "--data", "builtin:digits", "--checkpoint", "{good}", "--batch-size", "0"],
     "argument --batch-size: expected a positive int, got '0'"),
    ("demo-steps-0", ["demo", "--steps", "0"], "argument --steps: expected a positive int, got '0'"),
    ("convert-other-class-count", ["convert", "--model", "internimage_t", "--checkpoint", "{root}/weights.pth",
                                   "--out", "{root}/converted", "--set", "channels=16", "--set", "depths=[1, 1, 1, 1]",
                                   "--set", "groups=[1, 2, 4, 8]"],
     "the checkpoint's classifier has 3 classes, the model's 1000: build the model with num_classes=3"),
    ("convert-other-architecture", ["convert", "--model", "videomae_vit_s", "--checkpoint", "{good}", "--out",
                                    "{root}/converted"], "tensor shapes do not match the model"),
    ("convert-into-a-run-folder", ["convert", "--model", "internimage_t", "--checkpoint", "{root}/weights.pth",
                                   "--out", "{root}/only_bad"], "holds other files and no model.safetensors"),
    ("predict-headless", ["predict", "{image}", "--checkpoint", "{root}/headless"],
     "got a model without a classifier (num_classes=0"),
    ("model-is-a-folder", ["predict", "{image}", "--model", "{good}"],
     "is a path, not a model name: load a model folder with intern2.from_pretrained"),
    ("export-features-only", ["export", "onnx", "--checkpoint", "{root}/backbone", "--out", "{root}/fo.onnx"],
     "a features_only backbone cannot be exported to ONNX yet"),
    ("export-detector-img-size", ["export", "onnx", "--model", "mask_rcnn_internimage_t", "--out", "{root}/d.onnx",
                                  "--img-size", "64"], "--img-size is an image model's option; a detector takes"),
    ("export-detector-huge", ["export", "onnx", "--model", "mask_rcnn_internimage_t", "--out", "{root}/d.onnx",
                              "--image-size", "9000,9000"], "--image-size 9000,9000: expected at most 8192 pixels"),
    ("export-detector-opset-23", ["export", "onnx", "--model", "mask_rcnn_internimage_t", "--out", "{root}/d.onnx",
                                  "--opset", "23"], "--opset 23: a detector exports with opsets 17 to 20"),
    ("export-dtype", ["export", "onnx", "--checkpoint", "{good}", "--out", "{root}/m.onnx", "--dtype", "bf16"],
     "unrecognized arguments: --dtype bf16"),
    ("snippets-short-side-huge", ["extract-features", "{root}/clip.mp4", "--snippets", "thumos14", "--short-side",
                                  "100000", "--model", "videomae_vit_s", "--out", "{root}/snippets"],
     "--short-side: expected at most 8192 pixels, got 100000"),
    ("seg-slide-stride-over-window", ["predict", "{image}", "--checkpoint", "{seg}", "--slide", "16",
                                      "--slide-stride", "100"], "--slide-stride: expected at most the window"),
    ("predict-same-stem", ["predict", "{image}", "{root}/dup/a.png", "--checkpoint", "{seg}", "--out",
                           "{root}/seg_out"], "a.png would both be written as a_seg.png: rename one"),
    ("snippets-same-stem", ["extract-features", "{root}/clip.mp4", "{root}/dup/clip.mp4", "--snippets", "thumos14",
                            "--model", "videomae_vit_s", "--out", "{root}/snippets2"],
     "would both be written as clip.npy"),
    ("retrieve-topk-0", ["retrieve", "{root}/clip.mp4", "--query", "a cat", "--model", "internvideo_mm_tiny",
                         "--topk", "0"], "argument --topk: expected a positive int, got '0'"),
    ("translate-target-language", ["translate", "--src", "en", "--tgt", "klingonx", "hi"],
     "--tgt: unknown language 'klingonx'"),
    ("validation-unreadable", TRAIN + ["--set", "val_data={root}/val_bad"],
     "validation data: all 2 samples were unreadable, so the model saved in"),
]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(name, argv, message, files, capsys, tmp_path):
    for key, value in files.items():  # not str.format: YAML values hold braces
        argv = [a.replace(f"{{{key}}}", str(value)) for a in argv]
        message = message.replace(f"{{{key}}}", str(value))
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and " WARNING " not in line and " INFO " not in line]
    assert "Traceback" not in err and message in lines[-1], err


def test_a_diverging_run_ends_in_one_line_with_the_advice(tmp_path, capsys):
    """Valid input, a failed run: exit 1 (not a usage error), one line saying what to change."""
    argv = TRAIN + ["--set", "train.lr=1e30", "--set", "train.clip_grad=null", "--set", "train.max_steps=40",
                    "--out", str(tmp_path / "run")]
    code = cli.main(argv)
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if " WARNING " not in line and " INFO " not in line][-1]
    assert code == 1 and "Traceback" not in err
    assert last.startswith("intern2 train: error: training diverged: 10 attempts in a row at step ")
    assert "lower train.lr" in last


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_gpu_asked_for_without_one_is_named(tmp_path, capsys, files):
    assert cli.main([*TRAIN, "--set", "train.device=cuda", "--out", str(tmp_path)]) == 2
    assert "train.device: 'cuda' asked for, but torch sees no CUDA device" in capsys.readouterr().err
    for argv in (["predict", files["image"], "--checkpoint", files["good"], "--device", "cuda"],
                 ["eval", "--data", "builtin:digits", "--checkpoint", files["good"], "--device", "cuda"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            "--device: 'cuda' asked for, but torch sees no CUDA device here")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="/nope.pth does not exist"):
        cli.main(["--debug", *TRAIN, "--set", "checkpoint=/nope.pth", "--out", str(tmp_path)])


def test_debug_shows_the_exception_behind_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--debug", *TRAIN, "--set", "train.seed=-1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "error: train.seed: expected a number >= 0, got -1" in err
    assert "Traceback (most recent call last)" in err and "ValueError: train.seed" in err


def test_a_missing_extra_names_the_pip_command(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    code = cli.main(["eval", "--data", "builtin:shapes", "--model", "mask_rcnn_internimage_t"])
    assert code == 2 and "pip install 'intern2[data]'" in capsys.readouterr().err


def test_training_skips_bad_coco_annotations_and_rejects_a_broken_file(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from intern2.data.coco import CocoDetection, open_coco_source
    from intern2.data.shapes import generate_shapes
    root = generate_shapes(tmp_path / "shapes", num_train=2, num_val=1, size=32)
    data = json.loads((root / "instances_train.json").read_text())
    data["annotations"][0]["bbox"] = ["a", "b", "c", "d"]
    data["annotations"][1]["segmentation"] = {"size": [32, 32], "counts": "garbage!!"}
    data["annotations"][2]["segmentation"] = 5
    (root / "instances_train.json").write_text(json.dumps(data))
    source = open_coco_source(str(root), "train")
    assert source.skipped_annotations >= 2  # the string box and the int segmentation
    samples = [CocoDetection(source, False)[i] for i in range(len(source.images))]
    assert all(s is not None for s in samples)  # the undecodable RLE is dropped from its sample, not the sample
    (root / "instances_train.json").write_text(json.dumps({**data, "categories": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="categories\\[0\\]: expected an object with an integer 'id'"):
        open_coco_source(str(root), "train")
    (root / "instances_train.json").write_text("[]")
    with pytest.raises(ValueError, match="expected a JSON object .* got a list"):
        open_coco_source(str(root), "train")


def test_segmentation_labels_beyond_the_classes_are_named(tmp_path):
    pytest.importorskip("pycocotools")
    from intern2.data.segmentation import SegmentationDataset, open_seg_source
    from intern2.data.shapes import generate_shapes
    root = generate_shapes(tmp_path / "shapes", num_train=1, num_val=1, size=32)
    label = next((root / "annotations" / "val").glob("*.png"))
    Image.fromarray(np.full((32, 32), 200, dtype=np.uint8)).save(label)
    dataset = SegmentationDataset(open_seg_source(str(root), "val"), (0, 0, 0), (1, 1, 1), False, num_classes=4)
    with pytest.raises(ValueError, match=f"{label}: class 200 in the label map, but the model has 4 classes"):
        dataset[0]
    # `intern2 train segment` reads the validation labels before it trains: exit 2 with no run folder written.
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        cli.main(["train", "segment", "--data", str(root), "--out", str(out)])
    assert stop.value.code == 2 and not out.exists()


def test_a_closed_pipe_ends_quietly(tmp_path):
    result = subprocess.run(f"{sys.executable} -m intern2.cli languages | head -1", shell=True, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_export_refuses_a_model_it_cannot_export_at_once(tmp_path, capsys):
    model = intern2.create_model("actionformer_thumos14", input_dim=8, num_classes=2, embd_dim=16, fpn_dim=16,
                                 head_dim=16)
    intern2.save_pretrained(model, tmp_path / "tal")
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "onnx", "--checkpoint", str(tmp_path / "tal"), "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "a tal model cannot be exported to ONNX yet" in err and "Mask R-CNN" in err


def test_atomic_writes_leave_no_stale_temp_files_and_follow_the_umask(tmp_path):
    from intern2.checkpoint import atomic_write
    stale = tmp_path / ".last.pt.tmpabc123"
    stale.write_bytes(b"half a checkpoint from a killed write")
    atomic_write(tmp_path / "last.pt", lambda tmp: torch.save({"x": 1}, tmp))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    import os
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_write_killed_midway_keeps_the_old_file_and_the_next_start_removes_its_temp(tmp_path):
    import os
    import signal
    import time

    from intern2.checkpoint import atomic_write
    target = tmp_path / "last.pt"
    atomic_write(target, lambda tmp: torch.save({"step": 1}, tmp))
    writer = ("import sys, time\nfrom intern2.checkpoint import atomic_write\n"
              "def write(tmp):\n    with open(tmp, 'wb') as f:\n        f.write(b'half a checkpoint'); f.flush()\n"
              "        time.sleep(600)\n"
              f"atomic_write({str(target)!r}, write)\n")
    process = subprocess.Popen([sys.executable, "-c", writer])
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in tmp_path.glob(".last.pt.tmp*")):
            assert time.monotonic() < deadline and process.poll() is None, "the writer never started its write"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert list(tmp_path.glob(".last.pt.tmp*")), "kill -9 leaves the temp file behind"
    assert torch.load(target, weights_only=True) == {"step": 1}  # the old checkpoint is whole
    atomic_write(target, lambda tmp: torch.save({"step": 2}, tmp))  # the next run's first save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(target, weights_only=True) == {"step": 2}


def test_python_loaders_name_the_path(files):
    with pytest.raises(ValueError, match="weights.pth is a file, not a model folder: .*create_model"):
        intern2.from_pretrained(files["root"] / "weights.pth")
    with pytest.raises(FileNotFoundError, match="nowhere: no such model folder"):
        intern2.from_pretrained(files["root"] / "nowhere")
    with pytest.raises(ValueError, match="wrong_shapes: 103 tensor shapes do not match"):
        intern2.from_pretrained(files["wrong_shapes"])
    with pytest.raises(ValueError, match="config.json: nested too deeply"):
        intern2.from_pretrained(files["deep_config"])


def test_video_without_pyav_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    code = cli.main(["train", "video-cls", "--data", "builtin:actions", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "needs PyAV: pip install 'intern2[video]'" in err and "Traceback" not in err
