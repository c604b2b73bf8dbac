"""Video pre-training and action recognition end to end through the CLI on generated action clips."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import intern2
from intern2 import cli
from intern2.checkpoint import load_checkpoint
from intern2.data.actions import ACTION_CLASSES, generate_actions
from intern2.data.video import write_video
from intern2.pipelines.video_cls import VideoClassificationPipeline
from intern2.tasks.video_cls import VideoClassificationTask, VideoClsConfig

pytest.importorskip("av")
DATA = ["--set", "num_frames=4", "--set", "stride=2", "--set", "img_size=32"]
TRAIN = ["--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.log_every=1"]
TINY_CLS = ["--model", "videomae_vit_s", "--set",
            "model_args={embed_dim: 32, depth: 1, num_heads: 2, patch_size: 16}"]
TINY_PRETRAIN = ["--model", "videomae_pretrain_vit_s", "--set",
                 "model_args={encoder_embed_dim: 32, encoder_depth: 1, encoder_num_heads: 2, patch_size: 16, "
                 "decoder_embed_dim: 16, decoder_depth: 1, decoder_num_heads: 2}"]


@pytest.fixture(scope="module")
def actions(tmp_path_factory):
    return generate_actions(tmp_path_factory.mktemp("data") / "actions", num_train=12, num_val=6, num_frames=8,
                            size=32)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pretrained(actions, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    assert cli.main(["train", "video-pretrain", "--data", str(actions / "train.txt"), "--out", str(out),
                     *TINY_PRETRAIN, *DATA, *TRAIN, "--set", "decoder_mask_ratio=0.5"]) == 0
    return out


def test_pretraining_runs_and_reports_reconstruction(pretrained):
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses))
    evals = [r for r in records if "reconstruction_loss" in json.dumps(r)]
    assert evals, "pre-training evaluation did not report a reconstruction loss"
    model = intern2.from_pretrained(pretrained / "model")
    assert model.pretrained_cfg["mask_ratio"] == 0.9 and model.config["decoder_depth"] == 1


def test_eval_of_a_model_without_classifier_says_so(actions, tmp_path, capsys):
    encoder = intern2.create_model("videomae_vit_s", num_classes=0, embed_dim=32, depth=1, num_heads=2, img_size=32,
                                   all_frames=4)  # what UMT trains: no head to score the labels with
    intern2.save_pretrained(encoder, tmp_path / "encoder")
    with pytest.raises(SystemExit) as stop:
        cli.main(["eval", "--data", str(actions / "val.txt"), "--checkpoint", str(tmp_path / "encoder")])
    assert stop.value.code == 2
    assert "has no classifier" in capsys.readouterr().err.strip().splitlines()[-1]


def test_fine_tune_from_pretraining_then_eval_predict_extract(actions, pretrained, tmp_path, capsys):
    out = tmp_path / "cls"
    assert cli.main(["train", "video-cls", "--data", str(actions / "train.txt"), "--out", str(out), *TINY_CLS,
                     *DATA, *TRAIN, "--set", f"checkpoint={pretrained / 'model'}", "--set", "test_crops=3",
                     "--set", "test_clips=2"]) == 0
    metrics = _last_json(capsys.readouterr().out)
    assert metrics["count"] == 6 and 0 <= metrics["top1"] <= 100
    model = intern2.from_pretrained(out / "model")
    encoder = intern2.from_pretrained(pretrained / "model").encoder
    assert model.pretrained_cfg["label_names"] == list(ACTION_CLASSES) and model.pretrained_cfg["test_crops"] == 3
    assert not torch.equal(model.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)  # it trained

    assert cli.main(["eval", "--data", str(actions / "val.txt"), "--checkpoint", str(out / "model"), "--json"]) == 0
    evaluated = _last_json(capsys.readouterr().out)
    assert evaluated["count"] == 6

    clip = str(actions / "videos" / "val" / "00000.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 50)
    thin = write_video(tmp_path / "thin.mp4", np.zeros((4, 16, 640, 3), np.uint8))  # 40:1, too elongated to resize
    assert cli.main(["predict", str(thin), clip, str(bad), "--checkpoint", str(out / "model"), "--json", "--topk",
                     "3"]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)  # a bad file of the batch is reported, the others still run
    assert len(results[1]["top"]) == 3 and results[1]["top"][0]["label"] in ACTION_CLASSES
    assert "aspect ratio of 40:1" in results[0]["error"] and "thin.mp4" in captured.err
    assert "bad.mp4" in results[2]["error"] and "bad.mp4" in captured.err

    for name in ("features.safetensors", "features.npy"):
        assert cli.main(["extract-features", str(actions / "videos" / "val"), "--checkpoint", str(out / "model"),
                         "--out", str(tmp_path / name)]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "features.safetensors"), "pt") as f:
        features = f.get_tensor("features")
        files = json.loads(f.metadata()["files"])
    assert features.shape == (6, 32) and len(files) == 6
    np.testing.assert_allclose(np.load(tmp_path / "features.npy"), features.numpy(), rtol=1e-5, atol=1e-6)

    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "video.onnx"  # the clip size of training, dynamic batch; parity checked on export
    assert cli.main(["export", "onnx", "--checkpoint", str(out / "model"), "--out", str(onnx_path)]) == 0
    assert "onnxruntime vs torch max |diff|" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    views = torch.randn(5, 3, 4, 32, 32)
    (logits,) = session.run(None, {"video": views.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(views).numpy(), atol=1e-4)
    with pytest.raises(SystemExit) as refused:  # not a multiple of the patch size: one line, before exporting
        cli.main(["export", "onnx", "--checkpoint", str(out / "model"), "--out", str(tmp_path / "odd.onnx"),
                  "--static", "--img-size", "31"])
    assert refused.value.code == 2 and "--img-size 31: the model cannot take a 31x31 input" in capsys.readouterr().err
    assert not (tmp_path / "odd.onnx").exists()


def test_pretrained_encoder_transfers_to_classifier(pretrained):
    encoder = intern2.from_pretrained(pretrained / "model").encoder
    classifier = intern2.create_model("videomae_vit_s", embed_dim=32, depth=1, num_heads=2, patch_size=16,
                                      img_size=32, all_frames=4, num_classes=len(ACTION_CLASSES))
    load_checkpoint(classifier, pretrained / "model")
    assert torch.equal(classifier.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)
    assert torch.equal(classifier.patch_embed.proj.weight, encoder.patch_embed.proj.weight)


def test_fine_tune_builds_the_checkpoint_folders_architecture(actions, pretrained, tmp_path, capsys):
    # No --model, no model_args: a UMT-like ViT-B student folder and the tiny pre-training folder give their own
    # architectures and geometry (the default ViT-S was built before, and the weights refused).
    student = intern2.create_model("videomae_vit_b", num_classes=0, embed_dim=48, depth=1, num_heads=3, patch_size=16,
                                   img_size=32, all_frames=4)
    intern2.save_pretrained(student, tmp_path / "student")
    encoder = intern2.from_pretrained(pretrained / "model").encoder
    for folder, arch, source in ((tmp_path / "student", "videomae_vit_b", student),
                                 (pretrained / "model", "videomae_vit_s", encoder)):
        cfg = VideoClsConfig(data=str(actions / "train.txt"), num_frames=4, stride=2, img_size=32,
                             checkpoint=str(folder))
        model = VideoClassificationTask(cfg).build_model()
        assert model.pretrained_cfg["architecture"] == arch and model.num_classes == len(ACTION_CLASSES)
        assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    out = tmp_path / "cls"
    assert cli.main(["train", "video-cls", "--data", str(actions / "train.txt"), "--out", str(out), *DATA,
                     "--set", "train.max_steps=1", "--set", "train.batch_size=2",
                     "--set", f"checkpoint={tmp_path / 'student'}"]) == 0
    capsys.readouterr()
    model = intern2.from_pretrained(out / "model")
    assert model.pretrained_cfg["architecture"] == "videomae_vit_b" and model.config["embed_dim"] == 48
    # A model asked for by name is built as asked: the folder's weights do not fit it, and that is said.
    assert cli.main(["train", "video-cls", "--data", str(actions / "train.txt"), "--out", str(tmp_path / "s"), *DATA,
                     "--model", "videomae_vit_s", "--set", f"checkpoint={tmp_path / 'student'}"]) == 2
    assert "student: 17 tensor shapes do not match" in capsys.readouterr().err.strip().splitlines()[-1]


def test_multi_view_prediction_averages_views(tmp_path):
    model = intern2.create_model("videomae_vit_s", embed_dim=32, depth=1, num_heads=2, patch_size=16, img_size=32,
                                 all_frames=4, num_classes=3).eval()
    model.pretrained_cfg.update(num_frames=4, stride=1, input_size=(3, 4, 32, 32))
    frames = np.random.default_rng(0).integers(0, 255, (12, 32, 48, 3), dtype=np.uint8)
    path = write_video(tmp_path / "clip.mp4", frames)
    one, = VideoClassificationPipeline(model, test_clips=1, test_crops=1).predict_files([str(path)], topk=3)
    many, = VideoClassificationPipeline(model, test_clips=2, test_crops=3).predict_files([str(path)], topk=3)
    assert abs(sum(t["prob"] for t in one["top"]) - 1) < 1e-4 and abs(sum(t["prob"] for t in many["top"]) - 1) < 1e-4
    assert one["top"] != many["top"]


def test_bad_video_arguments_are_named(actions, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "video-cls", "--data", str(tmp_path / "missing.txt"), *TINY_CLS])
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "video-pretrain", "--data", str(actions / "train.txt"), *TINY_PRETRAIN,
                  "--set", "mask_ratio=1.5"])
    assert "mask_ratio" in capsys.readouterr().err
    for setting, message in (("decoder_mask_ratio=0.1", "decoder_mask_ratio: expected a value in [0.25, 1)"),
                             ("test_crops=2", "test_crops: expected 1 or 3, got 2")):
        with pytest.raises(SystemExit):
            cli.main(["train", "video-pretrain", "--data", str(actions / "train.txt"), *TINY_PRETRAIN,
                      "--set", setting])
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        cli.main(["extract-features", str(tmp_path), "--model", "videomae_vit_s", "--out", str(tmp_path / "f.txt")])
    assert "f.txt" in capsys.readouterr().err
