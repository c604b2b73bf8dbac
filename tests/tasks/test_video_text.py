"""Video-text training, evaluation, retrieval, zero-shot and embedding commands end to end on generated clips."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import intern2
from intern2 import cli
from intern2.data.actions import ACTION_CLASSES
from intern2.data.video import VideoDecodeError
from intern2.tasks.video_text import read_captions, retrieval_metrics

pytest.importorskip("av")
pytest.importorskip("tokenizers")
TRAIN = ["--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def actions(tmp_path_factory):
    from intern2.data.actions import generate_actions
    return generate_actions(tmp_path_factory.mktemp("data") / "actions", num_train=12, num_val=6, num_frames=8,
                            size=32)


@pytest.fixture(scope="module")
def trained(actions, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_text")
    assert cli.main(["train", "video-text", "--data", str(actions / "train_captions.jsonl"), "--out", str(out),
                     *TRAIN]) == 0
    return out


def test_training_reports_retrieval_and_zero_shot(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert losses and np.isfinite(losses).all()
    final = [r for r in records if r["split"] == "eval"][-1]
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_median_rank", "v2t_r1", "v2t_median_rank",
                "zero_shot_top1", "chance_t2v_r1", "chance_zero_shot"):
        assert key in final, key
    assert final["videos"] == 6 and final["chance_zero_shot"] == 10.0
    model_dir = trained / "model"
    assert (model_dir / "tokenizer.json").is_file()
    model = intern2.from_pretrained(model_dir)
    assert model.pretrained_cfg["prompt"] == "a video of {}" and len(model.pretrained_cfg["label_names"]) == 10
    assert model.pretrained_cfg["mean"][0] == pytest.approx(0.48145466)


def test_retrieve_zero_shot_embed_and_eval_commands(actions, trained, tmp_path, capsys):
    model = str(trained / "model")
    videos = actions / "videos" / "val"
    assert cli.main(["retrieve", "--videos", str(videos), "--query", "a red circle moves to the right",
                     "--checkpoint", model, "--topk", "3", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert len(ranked) == 3 and all(r["file"].endswith(".mp4") for r in ranked)
    assert ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0" * 100)
    assert cli.main(["retrieve", "--videos", str(videos / "00000.mp4"), str(broken), "--query", "a red circle",
                     "--checkpoint", model, "--json"]) == 1  # as every batch command: a failed file is status 1
    captured = capsys.readouterr()
    assert [r["file"] for r in json.loads(captured.out)] == [str(videos / "00000.mp4")] and "broken.mp4" in captured.err
    assert cli.main(["zero-shot", str(videos / "00000.mp4"), "--labels", "moving right, moving left,moving up",
                     "--checkpoint", model, "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert {t["label"] for t in result["top"]} == {"moving right", "moving left", "moving up"}
    assert sum(t["prob"] for t in result["top"]) == pytest.approx(1.0, abs=1e-4)
    # predict: zero-shot over the classes the model was trained with
    assert cli.main(["predict", "--task", "video-text", str(videos / "00001.mp4"), "--checkpoint", model,
                     "--topk", "10", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["top"]) == 10 and result["top"][0]["label"] in ACTION_CLASSES
    # ... which the pipeline's call gives too (one video, as every pipeline's call)
    from intern2.pipelines import open_pipeline
    pipeline = open_pipeline(model)
    assert pipeline(str(videos / "00001.mp4"), topk=10) == {"top": result["top"]}
    with pytest.raises(VideoDecodeError):
        pipeline(str(broken))
    out = tmp_path / "emb.safetensors"
    assert cli.main(["embed", "--videos", str(videos), "--texts", "a red square", "a blue star", "--checkpoint",
                     model, "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("video").shape == (6, 64) and f.get_tensor("text").shape == (2, 64)
        assert len(json.loads(f.metadata()["files"])) == 6
        torch.testing.assert_close(f.get_tensor("text").norm(dim=-1), torch.ones(2))
    assert cli.main(["embed", "--texts", "a red square", "--checkpoint", model, "--out", str(tmp_path / "t.npy")]) == 0
    assert np.load(tmp_path / "t.npy").shape == (1, 64)
    capsys.readouterr()
    assert cli.main(["eval", "--task", "video-text", "--data", str(actions / "val_captions.jsonl"),
                     "--checkpoint", model, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["videos"] == 6 and "zero_shot_top1" in metrics


def test_bad_inputs_get_clear_messages(actions, trained, tmp_path, capsys):
    model = str(trained / "model")
    (tmp_path / "empty").mkdir()
    cases = [(["retrieve", "--videos", str(tmp_path / "empty"), "--query", "x", "--checkpoint", model],
              "no video files found"),
             (["retrieve", "--videos", str(tmp_path / "nowhere"), "--query", "x", "--checkpoint", model],
              "no such file or folder"),
             (["retrieve", "--videos", str(actions / "videos"), "--query", "  ", "--checkpoint", model],
              "--query is empty"),
             (["zero-shot", str(actions / "videos" / "val" / "00000.mp4"), "--labels", "left,", "--checkpoint",
               model], "at least two"),
             (["retrieve", "--videos", str(actions / "videos"), "--query", "x", "--model", "internvideo_mm_tiny"],
              "--tokenizer is required"),
             (["train", "video-text", "--data", str(actions / "train.txt"), "--set", "vocab_size=0"],
              "vocab_size: expected at least 258")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    good = str(actions / "videos" / "val" / "00000.mp4")
    assert cli.main(["zero-shot", str(bad), good, "--labels", "a,b", "--checkpoint", model, "--json"]) == 1
    captured = capsys.readouterr()
    assert "bad.mp4" in captured.err and "Traceback" not in captured.err
    results = json.loads(captured.out)  # in the order given, the unreadable file named
    assert results[0]["file"] == str(bad) and "error" in results[0] and results[1]["file"] == good
    for override, message in (("model=videomae_vit_s", "is a video-cls model, not video-text"),
                              ("prompt=a video", "prompt 'a video': expected one '{}' where the label goes"),
                              ("prompt='{} and {}'", "found 2 fields")):
        with pytest.raises(SystemExit):
            cli.main(["train", "video-text", "--data", str(actions / "train_captions.jsonl"), "--set", override])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # before any video is encoded
        cli.main(["eval", "--data", str(actions / "val_captions.jsonl"), "--checkpoint", model, "--prompt", "a {"])
    assert refused.value.code == 2 and "--prompt 'a {': Single '{' encountered" in capsys.readouterr().err
    captions = tmp_path / "train.jsonl"
    captions.write_text('{"path": "a.mp4"}\n')
    with pytest.raises(SystemExit):
        cli.main(["train", "video-text", "--data", str(captions), "--out", str(tmp_path / "run")])
    assert "line 1" in capsys.readouterr().err


def test_clip_merges_file_is_a_tokenizer(tmp_path, capsys):
    """--tokenizer takes CLIP's merges file (the official checkpoints' vocabulary); a tiny one in its format here."""
    merges = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(merges, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n')
    out = tmp_path / "t.npy"
    assert cli.main(["embed", "--texts", "a cat", "A  CAT", "a dog", "--model", "internvideo_mm_tiny",
                     "--tokenizer", str(merges), "--out", str(out)]) == 0
    texts = np.load(out)
    assert texts.shape == (3, 64)
    np.testing.assert_allclose(texts[0], texts[1], atol=1e-6)  # CLIP's tokenizer lower-cases, ignores spacing
    assert not np.allclose(texts[0], texts[2])
    capsys.readouterr()
    # A text with a line break cannot be one line of t.texts.txt: refused, and the earlier output stays whole.
    assert cli.main(["embed", "--texts", "line one\nline two", "x", "--model", "internvideo_mm_tiny",
                     "--tokenizer", str(merges), "--out", str(out)]) == 2
    assert "text 1 has a line break" in capsys.readouterr().err
    assert np.load(out).shape == (3, 64) and len(out.with_suffix(".texts.txt").read_text().splitlines()) == 3


def test_read_captions_groups_videos_and_resolves_labels(actions, tmp_path):
    lines = [{"path": str(actions / "videos/val/00000.mp4"), "caption": "one", "label": "moving right"},
             {"path": str(actions / "videos/val/00001.mp4"), "caption": "two"},
             {"path": str(actions / "videos/val/00000.mp4"), "caption": "three", "label": 0}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (tmp_path / "classes.txt").write_text("moving right\nmoving left\n")
    source = read_captions(tmp_path / "list.jsonl")
    paths, labels, text_to_video = source.videos()
    assert len(paths) == 2 and labels == [0, -1] and text_to_video.tolist() == [0, 1, 0]
    assert source.classes == ("moving right", "moving left")


def test_retrieval_metrics_known_values():
    # 3 captions, 2 videos; captions 0 and 2 describe video 0, caption 1 video 1.
    similarity = torch.tensor([[0.9, 0.1],
                               [0.8, 0.2],
                               [0.1, 0.5]])
    metrics = retrieval_metrics(similarity, torch.tensor([0, 1, 0]))
    # t2v ranks: caption 0 -> 1, caption 1 -> 2, caption 2 -> 2.
    assert metrics["t2v_r1"] == pytest.approx(100 / 3) and metrics["t2v_median_rank"] == 2
    assert metrics["t2v_r5"] == 100.0 and metrics["t2v_mean_rank"] == pytest.approx(5 / 3)
    # v2t: video 0's best caption (0.9) ranks 1; video 1's caption (0.2) ranks 2, behind caption 2 (0.5).
    assert metrics["v2t_r1"] == 50.0 and metrics["v2t_mean_rank"] == pytest.approx(1.5)


# ------------------------------------------------------------------------------------------------ UMT
TINY_STUDENT = ["--set", "model=videomae_vit_s", "--set",
                "model_args={embed_dim: 32, depth: 2, num_heads: 2, patch_size: 8}", "--set", "student_layers=2"]


@pytest.mark.parametrize("masking", ["attention", "random"])
def test_umt_distils_a_video_text_teacher_into_a_student(actions, trained, tmp_path, capsys, masking):
    out = tmp_path / "umt"
    assert cli.main(["train", "umt", "--data", str(actions / "train.txt"), "--out", str(out), "--set",
                     f"teacher={trained / 'model'}", "--set", f"masking={masking}", *TINY_STUDENT,
                     "--set", "train.epochs=1", "--set", "train.batch_size=4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= metrics["distill_loss"] <= 4 and metrics["count"] == 6
    student = intern2.from_pretrained(out / "model")
    assert student.pretrained_cfg["keep_ratio"] == 0.2 and student.num_classes == 0
    classifier = intern2.create_model("videomae_vit_s", embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                      img_size=32, all_frames=8, num_classes=10)
    intern2.load_checkpoint(classifier, out / "model")  # fine-tuning starts from the distilled student
    torch.testing.assert_close(classifier.blocks[1].attn.qkv.weight, student.blocks[1].attn.qkv.weight)


def test_umt_with_a_videomae_teacher(actions, tmp_path, capsys):
    # A registered VideoMAE ViT-S (random weights here) with 16-pixel patches, resampled to the student's 8-pixel grid.
    assert cli.main(["train", "umt", "--data", str(actions / "train.txt"), "--out", str(tmp_path), "--set",
                     "teacher=videomae_vit_s", "--set", "img_size=32", *TINY_STUDENT, "--set", "train.epochs=1",
                     "--set", "train.batch_size=4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 6


def test_umt_bad_teacher_is_a_usage_error(actions, capsys):
    for teacher, message in (("no_such_model", "unknown model"), ("", "teacher: give a model folder"),
                             ("/nonexistent", "teacher /nonexistent: no such model folder"),
                             (str(actions / "train.txt"), "a file; give the model's registered name as teacher")):
        with pytest.raises(SystemExit):
            cli.main(["train", "umt", "--data", str(actions / "train.txt"), "--set", f"teacher={teacher}"])
        assert message in capsys.readouterr().err


def test_umt_masks_targets_and_loss():
    from intern2.models.video_vit import VideoViT, keep_visible
    from intern2.tasks.umt import UMTDistiller, _resample, attention_mask, random_mask, umt_loss
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(3, 64, 16, generator=generator)
    for mask in (attention_mask(target, 13, generator), random_mask(3, 64, 13, generator)):
        assert mask.shape == (3, 64) and ((~mask).sum(1) == 13).all()
    # A token that dominates the teacher's pooled attention is almost always kept.
    target[:, 5] = target.mean(1) * 40
    kept = sum(int(~attention_mask(target, 4, generator)[0, 5]) for _ in range(20))
    assert kept >= 18
    # Per-frame teacher maps (T=8, 4x4) onto a student grid of 2-frame tubelets at 2x2.
    features = torch.randn(2, 16, 8, 4, 4, generator=generator)
    resampled = _resample(features, (4, 2, 2))
    assert resampled.shape == (2, 16, 16)
    torch.testing.assert_close(resampled[:, 0], features[:, :, :2, :2, :2].mean((2, 3, 4)))
    assert umt_loss([target, target], target).item() == pytest.approx(0.0, abs=1e-6)
    assert umt_loss([-target], target).item() == pytest.approx(4.0, abs=1e-5)
    student = VideoViT(img_size=32, patch_size=8, num_classes=0, embed_dim=32, depth=2, num_heads=2, all_frames=8)
    distiller = UMTDistiller(student, teacher_dim=16, student_layers=2)
    video = torch.randn(2, 3, 8, 32, 32, generator=generator)
    mask = random_mask(2, 64, 13, generator)
    loss = umt_loss(distiller(video, mask), keep_visible(torch.randn(2, 64, 16, generator=generator), mask))
    loss.backward()
    # Every trainable parameter learns; the pooling norm (a classifier's, unused by distillation) is frozen.
    assert all(p.grad is not None for p in distiller.parameters() if p.requires_grad)
    assert [n for n, p in distiller.named_parameters() if not p.requires_grad] == ["student.fc_norm.weight",
                                                                                   "student.fc_norm.bias"]
