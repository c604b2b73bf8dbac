"""Image classification end to end through the CLI, in-process: data layouts, train, eval, predict, export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from intern2 import cli
from intern2.data.images import open_image_source, split_source

pytest.importorskip("sklearn")
TINY = "model_args={channels: 16, depths: [1, 1, 1, 1], groups: [1, 2, 4, 8], drop_path_rate: 0.0}"


def _write_folder(root, per_class=6, bad=()):
    from sklearn.datasets import load_digits
    digits = load_digits()
    for label in (3, 7):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        images = digits.images[digits.target == label][:per_class]
        for i, img in enumerate(images):
            Image.fromarray((img * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{i}.png")
    for name in bad:
        (root / "3" / name).write_bytes(b"\x89PNG not really")
    return root


def test_data_sources(tmp_path):
    folder = _write_folder(tmp_path / "folder")
    source = open_image_source(str(folder))
    assert source.classes == ("3", "7") and len(source.samples) == 12
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\n" + "".join(f"folder/{c}/{i}.png,{c}\n" for c in (3, 7) for i in range(2)))
    listed = open_image_source(str(csv_path))
    assert listed.classes == ("3", "7") and listed.samples[0][0].endswith("folder/3/0.png")
    train, val = split_source(source, 0.5, seed=0)
    assert len(train.samples) == len(val.samples) == 6 and {y for _, y in val.samples} == {0, 1}
    # A subset of a model's classes keeps the model's label indices.
    subset = open_image_source(str(folder), classes=[str(i) for i in range(10)])
    assert {y for _, y in subset.samples} == {3, 7}
    for spec, message in ((str(tmp_path / "missing"), "no such file"), ("builtin:cifar", "unknown built-in"),
                          (str(tmp_path), "not among|no image files|expected one sub-folder")):
        with pytest.raises(ValueError, match=message):
            open_image_source(spec, classes=["x"] if spec == str(tmp_path) else None)
    (tmp_path / "bad.csv").write_text("a.png\n")
    with pytest.raises(ValueError, match=r"bad.csv: row 1 .*expected 'path,label'"):
        open_image_source(str(tmp_path / "bad.csv"))


def test_train_eval_predict_export(tmp_path, capsys, caplog):
    data = _write_folder(tmp_path / "data", per_class=10, bad=("broken.png",))
    out = tmp_path / "run"
    code = cli.main(["train", "image-cls", "--data", str(data), "--model", "internimage_t", "--out", str(out),
                     "--set", TINY, "--set", "img_size=32", "--set", "train.epochs=1", "--set", "train.batch_size=5",
                     "--set", "val_fraction=0.3", "--set", "train.device=cpu"])
    assert code == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["count"] == 6 and 0 <= final["top1"] <= 100
    assert "skipping unreadable image" in caplog.text and "broken.png" in caplog.text

    assert cli.main(["eval", "--data", str(data), "--checkpoint", str(out / "model"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 20 and metrics["skipped"] == 1 and set(metrics["per_class_top1"]) == {"3", "7"}
    # The training run's own held-out split, scored by `eval`, is what the run reported.
    assert cli.main(["eval", "--data", str(data), "--checkpoint", str(out / "model"), "--val-fraction", "0.3",
                     "--seed", "0", "--json"]) == 0
    held_out = json.loads(capsys.readouterr().out)
    assert held_out["count"] == final["count"] and held_out["top1"] == pytest.approx(final["top1"], abs=1e-9)

    good = data / "7" / "0.png"
    assert cli.main(["predict", str(good), "--checkpoint", str(out / "model"), "--topk", "2", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["file"] == str(good) and len(result["top"]) == 2
    assert {t["label"] for t in result["top"]} <= {"3", "7"} and abs(sum(t["prob"] for t in result["top"]) - 1) < 1e-4

    assert cli.main(["predict", str(data / "7"), "--checkpoint", str(out / "model"), "--json"]) == 0  # a folder
    assert sorted(r["file"] for r in json.loads(capsys.readouterr().out)) == sorted(
        str(p) for p in (data / "7").glob("*.png"))
    assert cli.main(["predict", str(good), str(data / "3" / "broken.png"), "--checkpoint", str(out / "model")]) == 1
    captured = capsys.readouterr()
    assert "broken.png: not a readable image" in captured.err and str(good) in captured.out

    onnx_path = tmp_path / "model.onnx"
    assert cli.main(["export", "onnx", "--checkpoint", str(out / "model"), "--out", str(onnx_path)]) == 0
    assert onnx_path.exists() and "onnxruntime vs torch max |diff|" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "image-cls", "--data", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "nowhere: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["predict", "x.png"])  # before the model: files are checked first
    assert "no such file or folder: x.png" in capsys.readouterr().err
    _write_folder(tmp_path / "images", per_class=1)
    with pytest.raises(SystemExit):
        cli.main(["predict", str(tmp_path / "images")])
    assert "--model is required" in capsys.readouterr().err
    assert cli.main(["train", "no-such-task"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "image-cls", "--set", "train.lr"])
    assert "expected key=value" in capsys.readouterr().err


def test_batch_of_one_names_the_batch_size(tmp_path, capsys):
    # At 32 px the classifier head's BatchNorm sees a 1x1 map: one image per batch gives it one value per channel.
    data = _write_folder(tmp_path / "data", per_class=3)
    code = cli.main(["train", "image-cls", "--data", str(data), "--model", "internimage_t",
                     "--out", str(tmp_path / "run"), "--set", TINY, "--set", "img_size=32",
                     "--set", "train.max_steps=1", "--set", "train.batch_size=1", "--set", "train.device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "train.batch_size: a BatchNorm layer" in err[0] and "train.batch_size is 1" in err[0] and ">= 2" in err[0]


def test_eval_in_bfloat16_skips_strips_and_names_an_empty_split(tmp_path, capsys, caplog, monkeypatch):
    """`eval --dtype bf16` runs (it fed float32 images to a bfloat16 model); an image too elongated for the
    shorter-side resize is skipped as `predict` refuses it (eval used to resize it to gigabytes)."""
    import intern2
    import intern2.pipelines.common as common
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)  # the bfloat16 path on every CPU (else: fp32)
    converted = []
    to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: converted.append(a) or to(self, *a, **k))
    data = _write_folder(tmp_path / "data", per_class=2)
    Image.fromarray(np.zeros((2, 200, 3), np.uint8)).save(data / "7" / "strip.png")
    model = intern2.create_model("internimage_t", num_classes=2, channels=16, depths=[1, 1, 1, 1],
                                 groups=[1, 2, 4, 8])
    model.pretrained_cfg.update(label_names=["3", "7"], input_size=(3, 32, 32), crop_pct=1.0)
    intern2.save_pretrained(model, tmp_path / "model")
    results = {}
    for dtype in ("fp32", "bf16"):
        assert cli.main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "model"), "--dtype", dtype,
                         "--json"]) == 0
        results[dtype] = json.loads(capsys.readouterr().out)
        assert results[dtype]["count"] == 4 and results[dtype]["skipped"] == 1
    assert (torch.bfloat16,) in converted  # the model ran in bfloat16
    assert "strip.png of 200 x 2 pixels: an aspect ratio of 100:1" in caplog.text
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "model"), "--val-fraction", "0.1"])
    assert exc.value.code == 2 and "the held-out split of --data" in capsys.readouterr().err


def test_imagenet_wordnet_id_folders_of_a_subset(tmp_path, capsys):
    """An ImageNet subset in ImageNet's layout (Imagenette: a WordNet-id folder per class) scores an ImageNet model
    on the outputs of those ids, not on the first classes; through `intern2 eval` too."""
    pytest.importorskip("timm")
    import intern2
    from intern2.weights import label_set
    wordnet_ids = {"n01440764": 0, "n02102040": 217, "n03888257": 701}  # tench, English springer, parachute
    for wnid in wordnet_ids:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (40, 32), (int(wnid[-2:]), 90, 160)).save(tmp_path / "val" / wnid / "a.png")
    imagenet = label_set("imagenet-1k")
    source = open_image_source(str(tmp_path / "val"), imagenet)
    assert [y for _, y in source.samples] == list(wordnet_ids.values()) and source.classes == imagenet
    # A model of as many other classes reads them in sorted order (ImageFolder's convention); one of more cannot.
    assert [y for _, y in open_image_source(str(tmp_path / "val"), ["x", "y", "z"]).samples] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"class folders \['n01440764', .* are not among the model's classes"):
        open_image_source(str(tmp_path / "val"), ["w", "x", "y", "z"])
    model = intern2.create_model("internimage_t", channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8])
    intern2.save_pretrained(model, tmp_path / "model")  # ImageNet-1k's 1000 names, random weights
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "val"),
                     "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 3 and set(metrics["per_class_top1"]) == {"tench", "English springer", "parachute"}
    for wnid in list(wordnet_ids)[1:]:  # the summary line of one image says so
        (tmp_path / "val" / wnid / "a.png").unlink()
        (tmp_path / "val" / wnid).rmdir()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "val")]) == 0
    assert "(1 image at 224px, 0 unreadable)" in capsys.readouterr().out


def test_a_whole_imagenet_folder_needs_no_timm(tmp_path, monkeypatch):
    """All 1000 WordNet-id folders map in sorted order without timm's id list; only a subset needs it."""
    import sys
    timm_data = pytest.importorskip("timm.data")
    from intern2.weights import label_set
    wordnet_ids = timm_data.ImageNetInfo("imagenet-1k").label_names()
    for wnid in wordnet_ids:
        (tmp_path / "val" / wnid).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / wordnet_ids[5] / "a.png")
    monkeypatch.setitem(sys.modules, "timm.data", None)  # timm not installed
    source = open_image_source(str(tmp_path / "val"), label_set("imagenet-1k"))
    assert [y for _, y in source.samples] == [5]
    for wnid in wordnet_ids[500:]:
        (tmp_path / "val" / wnid).rmdir()
    with pytest.raises(ValueError, match=r"a subset of WordNet-id folders: .* pip install 'intern2\[timm\]'"):
        open_image_source(str(tmp_path / "val"), label_set("imagenet-1k"))
