"""Video data: PyAV reading, frame sampling, clip transforms, annotation lists, bad files, built-in actions."""
from __future__ import annotations

import json
import logging
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

av = pytest.importorskip("av")

from intern2.data.actions import ACTION_CLASSES, builtin_actions_root, generate_actions, render_action  # noqa: E402
from intern2.data.video import (FrameSampler, VideoDataset, VideoDecodeError, VideoEvalTransform,  # noqa: E402
                                VideoTrainTransform, clip_positions, collate_videos, dense_indices, probe_video,
                                read_annotations, read_video, segment_indices, write_video)


def _clip(num_frames=20, height=48, width=64):
    """Frames told apart by brightness and by a bright square's position (frame t: square at column 2t)."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = 20 + 9 * t
        frames[t, 8:24, 2 * t:2 * t + 16] = 250
    return frames


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    frames = _clip()
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, fps=10, crf=10), frames


def _error(path) -> str:
    with pytest.raises(VideoDecodeError) as info:
        read_video(path, [0])
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)
    return str(info.value)


def test_read_video_returns_the_written_frames(video_file):
    path, frames = video_file
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (20, 10.0, 48, 64)
    video = read_video(path)
    assert video.dtype == torch.uint8 and video.shape == (20, 48, 64, 3)
    assert np.abs(video.numpy().astype(int) - frames).mean() < 3  # codec loss only
    picked = read_video(path, [7, 2, 7, 19]).numpy().astype(int)
    nearest = [int(np.abs(frames.astype(int) - f).mean(axis=(1, 2, 3)).argmin()) for f in picked]
    assert nearest == [7, 2, 7, 19]
    assert torch.equal(read_video(path, lambda total: [total - 1]), read_video(path, [19]))
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        read_video(path, [20])


def test_frame_count_without_container_count(tmp_path):
    """Matroska stores no frame count: it is counted from the packets."""
    path = tmp_path / "clip.mkv"
    frames = _clip(12, 32, 32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    assert probe_video(path).num_frames == 12
    picked = read_video(path, [11, 0]).numpy().astype(int)
    assert np.abs(picked - frames[[11, 0]]).mean() < 6


def _write_stream(path, num_frames, gop=10, variable_rate=False):
    """A 32x48 H.264 stream (B-frames, a keyframe every ``gop``), optionally with a frame-rate change."""
    frames = np.random.default_rng(1).integers(0, 256, (num_frames, 32, 48, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.options = {"g": str(gop), "bf": "2"}
        if variable_rate:
            stream.codec_context.time_base = Fraction(1, 1000)
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if variable_rate:  # 30 fps, then 15 fps from frame 60
                frame.pts, frame.time_base = 33 * t + 33 * max(t - 60, 0), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("name, variable_rate", [("cfr.mp4", False), ("cfr.mkv", False), ("vfr.mp4", True)])
def test_seeking_reads_the_same_frames(tmp_path, monkeypatch, name, variable_rate):
    import intern2.data.video as video
    path = _write_stream(tmp_path / name, 120, variable_rate=variable_rate)
    seeks = []

    def spy(*args):
        outcome = "seek"
        try:
            yield from by_timestamp(*args)
        except video._NoTimestampIndex:
            outcome = "fallback"
            raise
        finally:
            seeks.append(outcome)

    by_timestamp = video._by_timestamp
    monkeypatch.setattr(video, "_by_timestamp", spy)
    for indices in (list(range(40, 104, 4)), segment_indices(120, 8, 0.5)[4:], [119, 35, 119]):
        assert torch.equal(read_video(path, indices), read_video(path, indices, seek=False))
    assert seeks == (["fallback"] * 3 if variable_rate else ["seek"] * 3)


def test_dense_indices():
    assert dense_indices(100, 4, 3, 0.0) == [0, 3, 6, 9]
    assert dense_indices(100, 4, 3, 1.0) == dense_indices(100, 4, 3, 0.999) == [90, 93, 96, 99]
    assert dense_indices(100, 4, 3, 0.5) == [45, 48, 51, 54]  # centred: 45 frames either side
    assert dense_indices(6, 4, 3, 0.5) == [0, 3, 5, 5]  # too short: repeat the last frame, keep the order
    sampler = FrameSampler(16, 4)
    for seed in range(20):
        indices = sampler(80, generator=torch.Generator().manual_seed(seed))
        assert 0 <= indices[0] <= 80 - 61 and np.all(np.diff(indices) == 4)
    starts = {sampler(80, generator=torch.Generator().manual_seed(s))[0] for s in range(20)}
    assert len(starts) > 5  # training windows move
    assert sampler(80, position=0.5) == sampler(80, position=0.5) == dense_indices(80, 16, 4, 0.5)


def test_segment_indices():
    assert segment_indices(40, 4, 0.5) == [5, 15, 25, 35]  # middle of each segment
    sampler = FrameSampler(8, mode="segment")
    for seed in range(20):
        indices = sampler(64, generator=torch.Generator().manual_seed(seed))
        assert all(8 * k <= i < 8 * (k + 1) for k, i in enumerate(indices))
    assert sampler(64, position=0.5) == [4, 12, 20, 28, 36, 44, 52, 60]
    short = sampler(5, generator=torch.Generator().manual_seed(0))
    assert len(short) == 8 and all(0 <= i < 5 for i in short) and short == sorted(short)
    assert clip_positions(1) == [0.5] and clip_positions(4) == [0.125, 0.375, 0.625, 0.875]
    with pytest.raises(ValueError, match="mode"):
        FrameSampler(mode="random")


def test_test_views_follow_the_official_test_code():
    # VideoMAE's Kinetics test: frames 4 apart from frame 0, 5 windows of 16 from the first to the last start.
    views = FrameSampler(16, 4, "dense").test_views(300, 5)
    strided = list(range(0, 300, 4))  # 75 frames
    starts = [int(k * (75 - 16) / 4) for k in range(5)]
    assert views == [strided[s:s + 16] for s in starts] and views[0][0] == 0 and views[-1][-1] == 296
    short = FrameSampler(16, 4, "dense").test_views(20, 2)  # 5 strided frames, the last one repeated
    assert short == [[0, 4, 8, 12, 16] + [16] * 11] * 2
    # VideoMAE's SSv2 test: two views, at the start and the middle of each of the 16 segments.
    first, second = FrameSampler(16, 1, "segment").test_views(48, 2)
    assert first == [3 * k for k in range(16)] and second == [3 * k + 1 for k in range(16)]
    assert FrameSampler(4, 1, "segment").test_views(40, 1) == [[5, 15, 25, 35]]
    # The InternVideo-MM demo: np.linspace(0, n - 1, 8), ends included.
    assert FrameSampler(8, 1, "uniform").test_views(300, 1) == [[0, 42, 85, 128, 170, 213, 256, 299]]
    with pytest.raises(ValueError, match="one test view"):
        FrameSampler(8, 1, "uniform").test_views(300, 2)


def test_train_transform_same_crop_every_frame():
    # Every frame is the same ramp image plus a per-frame offset: one crop box keeps the differences flat.
    ramp = torch.arange(60 * 80).reshape(60, 80) % 200
    video = ramp[None, :, :, None] + 5 * torch.arange(8)[:, None, None, None]
    video = video.expand(8, 60, 80, 3).to(torch.uint8)
    transform = VideoTrainTransform(32, flip=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    generator = torch.Generator().manual_seed(0)
    top, left, h, w = transform.crop_box(60, 80, torch.Generator().manual_seed(0))
    out = transform(video, generator)
    assert out.shape == (3, 8, 32, 32) and out.dtype == torch.float32
    steps = out[:, 1:] - out[:, :-1]
    assert torch.allclose(steps, torch.full_like(steps, 5 / 255), atol=1e-5)
    expected = torch.nn.functional.interpolate(video[:1, top:top + h, left:left + w].permute(0, 3, 1, 2).float(),
                                               (32, 32), mode="bilinear", antialias=True) / 255
    assert torch.allclose(out[:, 0], expected[0], atol=1e-5)
    # Flipping is random per clip when on, never when off.
    flipped = [VideoTrainTransform(80, scale=(1, 1), ratio=(4 / 3, 4 / 3))(video[:, :, :80],
                                                                          torch.Generator().manual_seed(s))
               for s in range(10)]
    assert len({float(f[0, 0, 0, 0]) for f in flipped}) == 2
    # No box of the full area fits a square into 60x80: the largest centred square it is.
    assert VideoTrainTransform(scale=(1, 1), ratio=(1, 1)).crop_box(60, 80) == (0, 10, 60, 60)


def test_normalisation_constants():
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.1)
    video = torch.tensor([51, 102, 153], dtype=torch.uint8).expand(4, 16, 16, 3)  # 255 * mean
    out = VideoEvalTransform(16, mean=mean, std=std)(video)
    assert out.shape == (1, 3, 4, 16, 16) and out.abs().max() < 1e-6
    white = VideoEvalTransform(16, mean=mean, std=std)(torch.full((1, 16, 16, 3), 255, dtype=torch.uint8))
    assert torch.allclose(white[0, :, 0, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))


def test_three_crops_along_the_long_side():
    transform = VideoEvalTransform(32, num_crops=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert transform.crop_boxes(32, 64) == [(0, 0), (0, 16), (0, 32)]  # left / centre / right
    assert transform.crop_boxes(128, 64) == [(0, 0), (16, 0), (32, 0)]  # top / middle / bottom (resized 64x32)
    columns = torch.arange(64, dtype=torch.uint8)[None, None, :, None].expand(2, 32, 64, 3)
    crops = transform(columns)
    assert crops.shape == (3, 3, 2, 32, 32)
    assert [round(float(c[0, 0, 0, 0]) * 255) for c in crops] == [0, 16, 32]
    assert VideoEvalTransform(32).crop_boxes(32, 64) == [(0, 16)]
    with pytest.raises(ValueError, match="resize"):
        VideoEvalTransform(32, resize=28)


def _list(tmp_path, text, name="list.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dataset_train_and_multiview(video_file, tmp_path):
    path, _ = video_file
    listing = _list(tmp_path, f"{path} 1\n{path} 0\n")
    source = read_annotations(listing)
    assert source.classes == ("0", "1") and [y for _, y in source.samples] == [1, 0]
    train = VideoDataset(source, FrameSampler(4, 2), VideoTrainTransform(32, flip=False), train=True, seed=3)
    first = train[0]
    assert first["video"].shape == (3, 4, 32, 32) and first["label"] == 1 and first["index"] == 0
    assert torch.equal(train[0]["video"], first["video"])  # seeded by (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(train[0]["video"], first["video"])
    test = VideoDataset(source, FrameSampler(4, 2), VideoEvalTransform(32, num_crops=3), train=False, num_clips=2)
    views = test[0]["video"]
    assert views.shape == (6, 3, 4, 32, 32)
    assert not torch.allclose(views[0], views[3])  # two clips at different times
    assert not torch.allclose(views[0], views[1])  # two crops of one clip
    single = VideoDataset(source, FrameSampler(4, 2), VideoEvalTransform(32), train=False, num_clips=2)
    assert torch.allclose(single[0]["video"], views[1::3])  # the centre crops
    batch = collate_videos([test[0], test[1]])
    assert batch["video"].shape == (2, 6, 3, 4, 32, 32) and batch["label"].tolist() == [1, 0]


@pytest.mark.parametrize("train", [True, False])
def test_cached_dataset_decodes_once_and_gives_the_same_clips(video_file, tmp_path, monkeypatch, train):
    import intern2.data.video as video_module
    path, _ = video_file
    source = read_annotations(_list(tmp_path, f"{path} 1\n{path} 0\n"))
    transform = VideoTrainTransform(32, flip=False) if train else VideoEvalTransform(32, num_crops=3)
    make = lambda cache: VideoDataset(source, FrameSampler(4, 2), transform, train=train, seed=3,  # noqa: E731
                                      num_clips=1 if train else 2, cache=cache)
    plain, cached = make(False), make(True)
    reads = []
    real_read = video_module.read_video
    monkeypatch.setattr(video_module, "read_video", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    for epoch in range(3):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(2):
            assert torch.equal(cached[index]["video"], plain[index]["video"])
    assert len(reads) == 6 + 2  # the plain dataset reads each time, the cached one once per video
    assert pickle.loads(pickle.dumps(cached))[0]["video"].shape == cached[0]["video"].shape


def test_annotation_lists(video_file, tmp_path):
    path, _ = video_file
    rel = path.name
    csv = read_annotations(_list(tmp_path, f"path,label\n{path},jump\n{path},run\n", "list.csv"))
    assert csv.classes == ("jump", "run") and [y for _, y in csv.samples] == [0, 1]
    spaced = read_annotations(_list(path.parent, f"{rel} 2\n", "spaced.txt"), classes=["a", "b", "c"])
    assert spaced.samples == ((str(path), 2),) and spaced.classes == ("a", "b", "c")
    (path.parent / "classes.txt").write_text("walk\nrun\n")
    named = read_annotations(_list(path.parent, f"{rel} run\n{rel} 0\n", "named.txt"))
    assert [y for _, y in named.samples] == [1, 0] and named.classes == ("walk", "run")
    (path.parent / "classes.txt").unlink()
    bad = _list(tmp_path, f"{path} 0\njust_one_field\n", "bad.txt")
    with pytest.raises(ValueError, match=r"bad\.txt: line 2 'just_one_field': expected 'path label'"):
        read_annotations(bad)
    with pytest.raises(ValueError, match=r"bad\.csv: line 3 .*expected 'path,label'"):
        read_annotations(_list(tmp_path, f"path,label\n{path},0\n{path},\n", "bad.csv"))
    with pytest.raises(ValueError, match=r"line 1: label 'swim'"):
        read_annotations(_list(tmp_path, f"{path} swim\n", "unknown.txt"), classes=["walk", "run"])
    with pytest.raises(ValueError, match="no samples"):
        read_annotations(_list(tmp_path, "# nothing\n", "empty.txt"))


def test_missing_file(video_file, tmp_path, caplog):
    path, _ = video_file
    missing = tmp_path / "gone.mp4"
    assert "no such video file" in _error(missing)
    with caplog.at_level(logging.WARNING):
        source = read_annotations(_list(tmp_path, f"{path} 0\n{missing} 1\n"))
    assert "1 of 2 listed files are missing" in caplog.text and "gone.mp4" in caplog.text
    strict = VideoDataset(source, FrameSampler(4, 1), VideoEvalTransform(32), train=False, skip_errors=False)
    with pytest.raises(VideoDecodeError, match="gone.mp4"):
        strict[1]
    with pytest.raises(ValueError, match="none of the 1 listed files exist"):
        read_annotations(_list(tmp_path, f"{missing} 0\n", "allgone.txt"))
    for frames in (np.zeros((4, 8, 8, 3), np.uint8), [str(path)]):  # frames are read from a file, not memory
        with pytest.raises(TypeError, match="video: expected a video file path, got"):
            probe_video(frames)


def test_bad_files_name_the_file(video_file, tmp_path):
    path, _ = video_file
    data = path.read_bytes()
    corrupt = tmp_path / "random.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    assert "not a readable video container" in _error(corrupt)
    truncated = tmp_path / "half.mp4"  # the index (moov) is written last, so half a file has none
    truncated.write_bytes(data[:len(data) // 2])
    assert "not a readable video container" in _error(truncated)
    audio = tmp_path / "audio.m4a"
    with av.open(str(audio), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert "no video stream (streams: audio)" in _error(audio)
    with pytest.raises(VideoDecodeError, match="audio.m4a"):
        probe_video(audio)


def test_overstated_frame_count(video_file, monkeypatch):
    """A container that claims a few frames more than decode repeats the last one; many more is truncation."""
    import intern2.data.video as video
    path, frames = video_file
    monkeypatch.setattr(video, "_frame_count", lambda *args: 22)
    tail = read_video(path, [0, 21]).numpy().astype(int)
    assert np.abs(tail - frames[[0, 19]]).mean() < 3
    monkeypatch.setattr(video, "_frame_count", lambda *args: 40)
    with pytest.raises(VideoDecodeError, match=r"clip\.mp4: the stream ends at frame 20 of 40"):
        read_video(path, [39])


def test_truncated_stream_with_index_first(tmp_path):
    """A 'faststart' file keeps its index at the front: cut short, its frames run out mid-decode."""
    path = tmp_path / "faststart.mp4"
    frames = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    assert read_video(path, [0]).shape == (1, 32, 32, 3)  # the intact start still reads
    with pytest.raises(VideoDecodeError, match=r"faststart\.mp4: .*truncated"):
        read_video(path, [29])


def test_training_skips_and_counts_bad_videos(video_file, tmp_path, caplog):
    path, _ = video_file
    corrupt = tmp_path / "bad.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    source = read_annotations(_list(tmp_path, f"{path} 0\n{corrupt} 1\n{path} 1\n"))
    dataset = VideoDataset(source, FrameSampler(4, 2), VideoTrainTransform(32, flip=False), train=True)
    with caplog.at_level(logging.WARNING):
        batches = list(DataLoader(dataset, batch_size=3, collate_fn=collate_videos))
    assert "skipping unreadable video" in caplog.text and "bad.mp4" in caplog.text
    assert len(batches) == 1 and batches[0]["skipped"] == 1
    assert batches[0]["video"].shape == (2, 3, 4, 32, 32) and batches[0]["index"].tolist() == [0, 2]
    empty = collate_videos([None, None])
    assert empty["video"].shape[0] == 0 and empty["label"].numel() == 0 and empty["skipped"] == 2


def test_render_action_mirror_pairs():
    for pair in range(len(ACTION_CLASSES) // 2):
        forward, caption = render_action(2 * pair, seed=11)
        backward, back_caption = render_action(2 * pair + 1, seed=11)
        assert forward.shape == (16, 64, 64, 3) and forward.dtype == np.uint8
        assert np.array_equal(forward[::-1], backward)  # same frames, reverse order
        assert not np.array_equal(forward, backward)  # ... and the order matters
        assert caption != back_caption and caption.split()[:3] == back_caption.split()[:3]
    again, caption = render_action(4, seed=11)
    assert np.array_equal(again, render_action(4, seed=11)[0]) and "clockwise" in caption
    assert not np.array_equal(again, render_action(4, seed=12)[0])


def test_generated_actions(tmp_path):
    root = generate_actions(tmp_path / "a", num_train=20, num_val=10, num_frames=8, size=32, seed=1)
    again = generate_actions(tmp_path / "b", num_train=20, num_val=10, num_frames=8, size=32, seed=1)
    for name in ("classes.txt", "train.txt", "val.txt", "train_captions.jsonl", "val_captions.jsonl"):
        assert (root / name).read_text() == (again / name).read_text()
    assert torch.equal(read_video(root / "videos/val/00003.mp4"), read_video(again / "videos/val/00003.mp4"))
    source = read_annotations(root / "train.txt")
    assert source.classes == ACTION_CLASSES
    assert np.bincount([y for _, y in source.samples]).tolist() == [2] * 10  # balanced
    captions = [json.loads(line) for line in (root / "val_captions.jsonl").read_text().splitlines()]
    assert [c["path"] for c in captions] == [f"videos/val/{i:05d}.mp4" for i in range(10)]
    assert all(c["caption"].startswith("a ") and len(c["caption"].split()) >= 4 for c in captions)
    assert read_video(root / "videos/train/00000.mp4").shape == (8, 32, 32, 3)
    # Training clips 2j and 2j + 1 are one scene in both directions.
    first, second = (read_video(root / f"videos/train/0000{i}.mp4").float() for i in (0, 1))
    assert (first.flip(0) - second).abs().mean() < 3


def test_builtin_root_is_cached_and_loads_in_workers(tmp_path):
    root = builtin_actions_root(num_train=10, num_val=10, home=tmp_path)
    stamp = (root / "train.txt").stat().st_mtime_ns
    assert builtin_actions_root(num_train=10, num_val=10, home=tmp_path) == root
    assert (root / "train.txt").stat().st_mtime_ns == stamp
    source = read_annotations(root / "val.txt")
    dataset = VideoDataset(source, FrameSampler(8, 2), VideoTrainTransform(32, flip=False), train=True)
    assert pickle.loads(pickle.dumps(dataset))[3]["label"] == dataset[3]["label"]  # spawn-started workers
    loader = DataLoader(dataset, batch_size=5, num_workers=2, collate_fn=collate_videos)
    batches = list(loader)
    assert [b["video"].shape for b in batches] == [(5, 3, 8, 32, 32)] * 2
    assert sorted(torch.cat([b["label"] for b in batches]).tolist()) == list(range(10))


def test_a_frame_size_change_within_a_video_is_named(tmp_path):
    """Two MPEG-TS files of other sizes, concatenated (a common result of joining recordings)."""
    from intern2.data.video import iter_frames
    parts = [write_video(tmp_path / f"{size}.ts", _clip(6, size, size), fps=10) for size in (32, 48)]
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(part.read_bytes() for part in parts))
    with pytest.raises(VideoDecodeError, match=r"joined.ts: the frame size changes within the video \(32x32 then "
                                               r"48x48\)"):
        read_video(joined)
    with pytest.raises(VideoDecodeError, match="frame size changes"):
        list(iter_frames(joined))


def test_a_list_that_is_not_utf8_is_named(tmp_path):
    listed = tmp_path / "val_latin.txt"
    listed.write_bytes("clip_é.mp4 0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"val_latin.txt: not a UTF-8 text file \(byte 0xe9"):
        read_annotations(listed)


def test_rgb_conversion_asks_for_one_thread_only_where_pyav_has_the_option(monkeypatch):
    """PyAV 17 added ``threads`` to frame conversion (and the thread pool it limits); older PyAV refuses it."""
    from intern2.data import video

    class OldFrame:  # PyAV < 17's signature
        def to_ndarray(self, format=None):
            return np.zeros((2, 2, 3), np.uint8)

    class NewFrame:
        def to_ndarray(self, format=None, threads=None):
            assert threads == 1
            return np.zeros((2, 2, 3), np.uint8)

    monkeypatch.setattr(video, "_AV_THREADED_REFORMAT", False)
    assert video._rgb(OldFrame()).shape == (2, 2, 3)
    monkeypatch.setattr(video, "_AV_THREADED_REFORMAT", True)
    assert video._rgb(NewFrame()).shape == (2, 2, 3)
    assert video._threaded_reformat() == (int(pytest.importorskip("av").__version__.split(".")[0]) >= 17)
