"""The built-in untrimmed videos: ActivityNet-layout annotations, segments where the motion is, atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from intern2.data import untrimmed  # noqa: E402
from intern2.data.actions import ACTION_CLASSES  # noqa: E402
from intern2.data.untrimmed import builtin_untrimmed_root, generate_untrimmed, render_untrimmed  # noqa: E402
from intern2.data.video import probe_video, read_video  # noqa: E402
from intern2.tasks.tal import load_ground_truth  # noqa: E402

NUM_CLASSES = 6
FPS = 8
# Mean absolute difference (uint8 levels) of decoded frames. A held frame still changes by up to ~0.45 as
# H.264 refines it over later frames (measured on 150 videos at 64 px); every instance takes its picture at
# least ~1.0 away from its first frame (the slowest: a small square rotating).
STILL_TOLERANCE = 0.6
MOTION_THRESHOLD = 0.9


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = generate_untrimmed(tmp_path_factory.mktemp("untrimmed") / "u", num_train=6, num_val=3,
                              num_classes=NUM_CLASSES, fps=FPS, seed=3)
    return root, json.loads((root / "annotations.json").read_text())


def _frame_ranges(record):
    """(first, last) frames of each annotated instance, from the [first / fps, (last + 1) / fps] segments."""
    ranges = []
    for entry in record["annotations"]:
        first, end = (value * record["fps"] for value in entry["segment"])
        assert first == round(first) and end == round(end)  # on the frame grid
        ranges.append((round(first), round(end) - 1))
    return ranges


def test_annotation_layout(dataset):
    root, data = dataset
    assert set(data) == {"version", "taxonomy", "database"}
    assert data["version"] == f"intern2-untrimmed-v{untrimmed.VERSION}"
    classes = ACTION_CLASSES[:NUM_CLASSES]
    assert data["taxonomy"] == [{"nodeName": name, "nodeId": i} for i, name in enumerate(classes)]
    assert (root / "classes.txt").read_text().splitlines() == list(classes)
    database = data["database"]
    assert list(database) == [f"train_{i:05d}" for i in range(6)] + [f"val_{i:05d}" for i in range(3)]
    assert sorted(p.stem for p in (root / "videos").iterdir()) == sorted(database)  # unique ids, one file each
    assert [r["subset"] for r in database.values()] == ["training"] * 6 + ["validation"] * 3
    for record in database.values():
        assert set(record) == {"subset", "duration", "fps", "num_frames", "url", "annotations"}
        assert record["fps"] == FPS and record["url"] == "" and record["duration"] == record["num_frames"] / FPS
        assert untrimmed.VIDEO_FRAMES[0] <= record["num_frames"] <= untrimmed.VIDEO_FRAMES[1]
        assert 1 <= len(record["annotations"]) <= untrimmed.INSTANCES[1]
        for entry in record["annotations"]:
            assert set(entry) == {"label", "label_id", "segment"}
            assert 0 <= entry["label_id"] < NUM_CLASSES and entry["label"] == classes[entry["label_id"]]
    # The TAL metric reads it as ground truth.
    instances, names = load_ground_truth(root / "annotations.json", "validation")
    assert names == dict(enumerate(classes))
    assert len(instances) == sum(len(database[f"val_{i:05d}"]["annotations"]) for i in range(3))


def test_segments_lie_in_the_video_apart(dataset):
    _, data = dataset
    for record in data["database"].values():
        segments = [entry["segment"] for entry in record["annotations"]]
        assert all(0 <= start < end <= record["duration"] for start, end in segments)
        gaps = [later[0] - earlier[1] for earlier, later in zip(segments, segments[1:])]
        assert all(gap >= untrimmed.GAP_FRAMES[0] / FPS for gap in gaps)  # in time order, never touching


def test_files_hold_the_annotated_frames(dataset):
    root, data = dataset
    for video_id, record in data["database"].items():
        info = probe_video(root / "videos" / f"{video_id}.mp4")
        assert (info.num_frames, info.fps, info.width, info.height) == (record["num_frames"], FPS, 64, 64)
        assert info.num_frames / info.fps == record["duration"]


def test_motion_marks_the_segments(dataset):
    """On decoded frames: every frame of a background stretch is within codec noise of the stretch's first
    frame, while every instance moves its picture well away from its first frame."""
    root, data = dataset
    for video_id, record in data["database"].items():
        video = read_video(root / "videos" / f"{video_id}.mp4").float()
        ranges = _frame_ranges(record)
        background = torch.ones(len(video), dtype=torch.bool)
        for first, last in ranges:
            background[first:last + 1] = False
            reach = (video[first:last + 1] - video[first]).abs().mean(dim=(1, 2, 3)).max()
            assert reach > MOTION_THRESHOLD, (video_id, first, last, float(reach))
        stretches = [(first, last) for first, last in zip([0] + [b + 1 for _, b in ranges],
                                                          [a - 1 for a, _ in ranges] + [len(video) - 1])
                     if first <= last]
        assert sum(last - first + 1 for first, last in stretches) == int(background.sum())
        for first, last in stretches:
            drift = (video[first:last + 1] - video[first]).abs().mean(dim=(1, 2, 3)).max()
            assert drift < STILL_TOLERANCE, (video_id, first, last, float(drift))


def test_render_untrimmed_moves_exactly_inside_the_segments():
    """Before encoding, background frames repeat exactly, and each instance changes from its first frame on
    and up to its last one (so its boundaries are where the motion starts and stops)."""
    for seed in range(12):
        frames, segments = render_untrimmed(seed, size=32)
        assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 32, 3)
        changes = (frames[1:] != frames[:-1]).any(axis=(1, 2, 3))  # changes[t]: frame t -> t + 1
        inside = np.zeros(len(frames), bool)
        for label, first, last in segments:
            assert 0 <= label < len(ACTION_CLASSES)
            assert changes[first] and changes[last - 1]
            inside[first:last + 1] = True
        assert not changes[~inside[:-1] & ~inside[1:]].any()
        # The only other change is one scene cut where a gap meets an instance.
        assert changes.sum() - sum(changes[first:last].sum() for _, first, last in segments) <= len(segments) - 1
    assert max(label for seed in range(40) for label, *_ in render_untrimmed(seed, num_classes=2)[1]) == 1


def test_same_seed_same_dataset(dataset, tmp_path):
    root, _ = dataset
    again = generate_untrimmed(tmp_path / "again", num_train=6, num_val=3, num_classes=NUM_CLASSES, fps=FPS, seed=3)
    assert (again / "annotations.json").read_bytes() == (root / "annotations.json").read_bytes()
    for video_id in ("train_00004", "val_00001"):
        assert torch.equal(read_video(again / "videos" / f"{video_id}.mp4"),
                           read_video(root / "videos" / f"{video_id}.mp4"))
    other = generate_untrimmed(tmp_path / "other", num_train=6, num_val=3, num_classes=NUM_CLASSES, fps=FPS, seed=4)
    assert (other / "annotations.json").read_bytes() != (root / "annotations.json").read_bytes()


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    write_video = untrimmed.write_video

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError("disk full")
        return write_video(*args, **kwargs)

    monkeypatch.setattr(untrimmed, "write_video", failing)
    with pytest.raises(OSError, match="disk full"):
        generate_untrimmed(tmp_path / "u", num_train=4, num_val=2)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []  # neither root nor a staging folder


def test_builtin_root_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path))
    root = builtin_untrimmed_root(num_train=2, num_val=1, num_classes=4, size=32)
    assert root.parent == tmp_path / "builtin" and root.name.startswith(f"untrimmed-v{untrimmed.VERSION}-")
    stamp = (root / "annotations.json").stat().st_mtime_ns
    assert builtin_untrimmed_root(num_train=2, num_val=1, num_classes=4, size=32) == root
    assert (root / "annotations.json").stat().st_mtime_ns == stamp
    assert builtin_untrimmed_root(num_train=2, num_val=1, num_classes=5, size=32) != root


@pytest.mark.parametrize("kwargs", [{"size": 63}, {"num_classes": 0}, {"num_classes": len(ACTION_CLASSES) + 1},
                                    {"fps": 7.5}, {"fps": 0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="generate_untrimmed"):
        generate_untrimmed(tmp_path / "u", num_train=1, num_val=1, **kwargs)
    assert not (tmp_path / "u").exists()
