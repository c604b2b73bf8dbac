"""Snippet features for temporal action localization: the snippet grid and timestamps, streaming decoding equal
to random access, every video encoder family, folder extraction with resume, and the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import intern2
from intern2 import cli
from intern2.data.video import VideoDecodeError, VideoInfo, iter_frames, read_video, write_video
from intern2.pipelines.common import load_model
from intern2.pipelines.snippets import SNIPPET_PRESETS, SnippetFeatureExtractor, SnippetProtocol
from intern2.pipelines.video_cls import VideoClassificationPipeline, pooled_features

pytest.importorskip("av")
FPS = 10
LENGTHS = {"a": 30, "b": 21, "short": 5}
TINY_VIT = dict(patch_size=16, img_size=32, all_frames=4)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "cls":
        return intern2.create_model("videomae_vit_s", embed_dim=32, depth=1, num_heads=2, num_classes=3, **TINY_VIT)
    if kind == "pretrain":
        return intern2.create_model("videomae_pretrain_vit_s", encoder_embed_dim=32, encoder_depth=1,
                                    encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                    **TINY_VIT)
    return intern2.create_model("internvideo_mm_tiny", num_frames=4)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for name, length in LENGTHS.items():
        write_video(root / f"{name}.mp4", rng.integers(0, 255, (length, 32, 48, 3), dtype=np.uint8), fps=FPS)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "cls"
    intern2.save_pretrained(_model("cls"), out)
    return str(out)


def _reference(kind: str, model: torch.nn.Module, frames: torch.Tensor, short_side) -> torch.Tensor:
    """The pipeline's feature of one clip of frames, through its own transform (one centre crop)."""
    if kind == "video-text":
        pytest.importorskip("tokenizers")
        from intern2.pipelines.video_text import VideoTextPipeline, encode_views
        from intern2.text.bpe import BPETokenizer
        tokenizer = BPETokenizer.train(["a red circle", "a blue square"], vocab_size=300, context_length=32)
        pipeline = VideoTextPipeline(model, tokenizer, short_side=short_side)
        return encode_views(model, pipeline.transform(frames)[None])[0]
    pipeline = VideoClassificationPipeline(model, test_crops=1, short_side=short_side)
    with torch.inference_mode():
        return pooled_features(model, pipeline.transform(frames))[0]


@pytest.mark.parametrize("kind, protocol", [
    ("cls", SnippetProtocol(8, 4, batch_size=4)),  # 8 frames sampled down to the model's 4; a partial last batch
    ("cls", SnippetProtocol(4, 6, frames_per_snippet=4, batch_size=2)),  # stride > snippet: frames in between unused
    ("pretrain", SnippetProtocol(8, 4, frames_per_snippet=8)),
    ("video-text", SnippetProtocol(8, 4, short_side=40)),
])
def test_streamed_snippets_equal_random_access(kind, protocol, videos):
    model = _model(kind)
    extractor = SnippetFeatureExtractor(model, protocol)
    video = str(videos / "a.mp4")
    result = extractor(video)
    frames, stride = protocol.snippet_frames, protocol.stride
    count = (LENGTHS["a"] - frames) // stride + 1
    starts = np.arange(count) * stride
    assert result.features.shape == (count, extractor.feature_dim) and result.features.dtype == torch.float32
    np.testing.assert_allclose(result.timestamps.numpy(), (starts + 0.5 * frames) / FPS)
    np.testing.assert_allclose(result.segments.numpy(), np.stack([starts, starts + frames], 1) / FPS)
    assert (result.fps, result.num_video_frames, result.duration) == (FPS, LENGTHS["a"], LENGTHS["a"] / FPS)
    offsets = extractor.offsets
    assert len(offsets) == (protocol.frames_per_snippet or 4) and offsets[0] == 0 and offsets[-1] == frames - 1
    for i, start in enumerate(starts):
        clip = read_video(video, [int(start) + o for o in offsets])
        expected = _reference(kind, model, clip, protocol.short_side)
        torch.testing.assert_close(result.features[i], expected, atol=1e-5, rtol=1e-5)
    if kind == "video-text":  # the normalised embedding
        torch.testing.assert_close(result.features.norm(dim=-1), torch.ones(count))


def test_iter_frames_streams_what_read_video_reads(videos, tmp_path):
    video = videos / "b.mp4"
    np.testing.assert_array_equal(np.stack(list(iter_frames(video))), read_video(video).numpy())
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 50)
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        next(iter_frames(bad))


def test_frame_rate_and_length_errors_name_the_file(videos, monkeypatch):
    model = _model("cls")
    extractor = SnippetFeatureExtractor(model, SNIPPET_PRESETS["thumos14"])
    with pytest.raises(VideoDecodeError, match=r"short\.mp4: 5 frames, fewer than the 16"):
        extractor(str(videos / "short.mp4"))
    overridden = SnippetFeatureExtractor(model, SnippetProtocol(8, 4), fps=25.0)(str(videos / "a.mp4"))
    assert overridden.fps == 25.0 and overridden.timestamps[0].item() == pytest.approx(4 / 25)
    monkeypatch.setattr("intern2.pipelines.snippets.probe_video", lambda path: VideoInfo(30, 0.0, 48, 32))
    with pytest.raises(VideoDecodeError, match=r"a\.mp4: the container states no frame rate"):
        extractor(str(videos / "a.mp4"))
    with pytest.raises(ValueError, match="crop"):  # the CLIP tower takes its own resolution only
        SnippetFeatureExtractor(_model("video-text"), SnippetProtocol(8, 4, crop=48))
    with pytest.raises(ValueError, match="SnippetProtocol.stride"):
        SnippetProtocol(16, 0)


def _extract(videos, out, *options: str) -> int:
    return cli.main(["extract-features", str(videos), *options, "--out", str(out)])


def test_cli_equals_api_and_resumes(videos, folder, tmp_path, capsys):
    custom = ["--checkpoint", folder, "--snippets", "custom", "--snippet-frames", "8"]
    assert _extract(videos, tmp_path / "cli", *custom, "--snippet-stride", "4") == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "short.mp4" in errors[0] and "5 frames" in errors[0] and " 8 " in errors[0]
    cli_dir, api_dir = tmp_path / "cli", tmp_path / "api"
    assert sorted(p.name for p in cli_dir.iterdir()) == ["a.json", "a.npy", "b.json", "b.npy"]

    extractor = SnippetFeatureExtractor(load_model(folder, None), SnippetProtocol(8, 4), source=folder)
    files = [str(videos / f"{name}.mp4") for name in LENGTHS]
    summary = extractor.extract_to_folder(files, api_dir)
    assert summary["done"] == files[:2] and not summary["skipped_existing"]
    assert len(summary["failed"]) == 1 and "short.mp4" in summary["failed"][0]
    for name in ("a", "b"):
        features = np.load(cli_dir / f"{name}.npy")
        assert features.dtype == np.float32 and features.shape == ((LENGTHS[name] - 8) // 4 + 1, 32)
        np.testing.assert_array_equal(features, np.load(api_dir / f"{name}.npy"))
        sidecar = json.loads((cli_dir / f"{name}.json").read_text())
        assert sidecar == json.loads((api_dir / f"{name}.json").read_text())
        assert sidecar["video"] == str((videos / f"{name}.mp4").resolve())
        assert sidecar["encoder"] == "videomae_vit_s.k400" and sidecar["source"] == folder
        assert (sidecar["fps"], sidecar["num_video_frames"]) == (FPS, LENGTHS[name])
        assert sidecar["duration"] == LENGTHS[name] / FPS and sidecar["fps_override"] is None
        assert (sidecar["snippet_frames"], sidecar["stride"], sidecar["frames_per_snippet"]) == (8, 4, 4)
        assert sidecar["feature_dim"] == 32 and sidecar["crop"] == 32 and sidecar["short_side"] == 32  # scaled
        assert sidecar["timestamps"] == pytest.approx([(4 * i + 4) / FPS for i in range(len(features))])

    # a rerun skips what is done (the API sees the CLI's files as its own), a changed setting re-extracts
    assert extractor.extract_to_folder(files, cli_dir)["skipped_existing"] == files[:2]
    written = (cli_dir / "a.npy").stat().st_mtime_ns
    assert _extract(videos, cli_dir, *custom, "--snippet-stride", "2") == 1
    assert json.loads((cli_dir / "a.json").read_text())["stride"] == 2 and np.load(cli_dir / "a.npy").shape[0] == 12
    assert (cli_dir / "a.npy").stat().st_mtime_ns != written
    # a .npy without its sidecar (a run killed between the two writes) is redone; the finished one is not
    (cli_dir / "b.json").unlink()
    (cli_dir / "b.npy").write_bytes(b"stale")
    written = (cli_dir / "a.npy").stat().st_mtime_ns
    assert _extract(videos, cli_dir, *custom, "--snippet-stride", "2") == 1
    assert np.load(cli_dir / "b.npy").shape == (7, 32) and (cli_dir / "b.json").is_file()
    assert (cli_dir / "a.npy").stat().st_mtime_ns == written

    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(videos / "a.mp4", only)
    assert _extract(only, tmp_path / "ok", *custom, "--snippet-stride", "4") == 0


def test_video_text_model_through_the_cli(videos, tmp_path):
    model = _model("video-text")
    intern2.save_pretrained(model, tmp_path / "vt")
    only = tmp_path / "in"
    only.mkdir()
    shutil.copy(videos / "a.mp4", only)
    assert _extract(only, tmp_path / "out", "--checkpoint", str(tmp_path / "vt"), "--snippets", "activitynet",
                    "--snippet-frames", "8", "--short-side", "32") == 0
    features = np.load(tmp_path / "out" / "a.npy")
    expected = SnippetFeatureExtractor(model, SnippetProtocol(8, 16, short_side=32))(str(only / "a.mp4")).features
    assert features.shape == (2, 64)
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-6)
    assert json.loads((tmp_path / "out" / "a.json").read_text())["encoder"] == "internvideo_mm_tiny"


@pytest.mark.parametrize("options, named", [
    (["--snippets", "custom", "--snippet-frames", "8"], "--snippet-stride"),
    (["--snippets", "thumos14", "--snippet-stride", "0"], "--snippet-stride"),
    (["--snippets", "thumos14", "--fps", "-1"], "--fps"),
    (["--snippets", "thumos14", "--batch-size", "two"], "--batch-size"),
    (["--snippets", "thumos14", "--stride", "2"], "--stride"),
    (["--snippets", "thumos14", "--short-side", "0"], "--short-side"),
    (["--snippets", "thumos", "--model", "videomae_vit_s"], "--snippets"),
    (["--snippet-frames", "8"], "--snippet-frames"),
])
def test_bad_arguments_exit_2_naming_them(options, named, videos, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _extract(videos, tmp_path / "out", *options)
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_bad_outputs_and_duplicate_names_exit_2(videos, folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _extract(videos, tmp_path / "features.npy", "--checkpoint", folder, "--snippets", "thumos14")
    assert exit_info.value.code == 2 and "folder" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(videos / "a.mp4", other)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["extract-features", str(videos), str(other), "--checkpoint", folder, "--snippets", "thumos14",
                  "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "a.npy" in err and str(other / "a.mp4") in err
    assert not (tmp_path / "out").exists()
