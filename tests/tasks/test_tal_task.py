"""`intern2 train tal` / `eval` / `predict` / the server on snippet-feature folders: one trained localizer gives the
same answer through every door, the official metric scores it as `eval-tal` does, bad entries are skipped and
counted with a message naming the file and entry; the built-in untrimmed data extracts its features once."""
from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from intern2 import cli

CLASSES = ["jump", "run"]
FPS, STRIDE, FRAMES, DIM = 8.0, 2, 8, 6
TINY = ("{embd_dim: 16, fpn_dim: 16, head_dim: 16, arch: [2, 1, 2], n_mha_win_size: 5, max_seq_len: 64, "
        "regression_range: [[0, 4], [4, 8], [8, 1000]], droppath: 0.0}")


def _seconds(step: float) -> float:
    return (step * STRIDE + FRAMES / 2) / FPS


def make_features(root: Path, videos: int = 14, seed: int = 0) -> Path:
    """Feature files where an action of class c raises channel c over its steps, + ActivityNet-layout annotations
    (the last 4 videos are the validation subset)."""
    rng = np.random.default_rng(seed)
    (root / "feats").mkdir(parents=True)
    database = {}
    for i in range(videos):
        length = int(rng.integers(30, 60))
        feats = rng.normal(size=(length, DIM)).astype(np.float32) * 0.1
        start, size, label = int(rng.integers(2, length // 2)), int(rng.integers(6, 14)), i % 2
        feats[start:start + size, label] += 2.0
        np.save(root / "feats" / f"v{i}.npy", feats)
        database[f"v{i}"] = {"subset": "training" if i < videos - 4 else "validation", "fps": FPS,
                             "duration": (length * STRIDE + FRAMES) / FPS,
                             "annotations": [{"label": CLASSES[label], "label_id": label,
                                              "segment": [_seconds(start), _seconds(start + size)]}]}
    (root / "ann.json").write_text(json.dumps({"database": database}))
    return root


def _data_args(root: Path):
    return ["--set", f"annotations={root / 'ann.json'}", "--set", f"features={root / 'feats'}",
            "--set", f"feat_stride={STRIDE}", "--set", f"feat_num_frames={FRAMES}"]


def _train(root: Path, out: Path, steps: int = 40):
    code = cli.main(["train", "tal", *_data_args(root), "--set", f"model_args={TINY}",
                     "--set", f"train.max_steps={steps}", "--set", "train.batch_size=4", "--set", "train.lr=2e-3",
                     "--set", "train.device=cpu", "--set", f"train.eval_every={steps}", "--out", str(out)])
    assert code == 0
    return out / "model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_features(tmp_path_factory.mktemp("tal"))
    return root, _train(root, root / "run")


def test_every_door_gives_the_same_segments(trained, capsys):
    """Python pipeline, `intern2 predict --json` and POST /v1/video/localize on one feature file."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from intern2.pipelines import open_pipeline
    from intern2.serve.app import create_app
    root, model = trained
    file = root / "feats" / "v12.npy"
    pipeline = open_pipeline(str(model))
    assert pipeline.task == "tal" and pipeline.labels == CLASSES
    python = pipeline(str(file), fps=FPS)  # the doors' defaults agree (min_score 0.05, top 10)
    assert python["segments"] and all(0 <= s["segment"][0] < s["segment"][1] <= python["duration"]
                                      for s in python["segments"])
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(model), str(file), "--fps", str(FPS), "--json"]) == 0
    (from_cli,) = json.loads(capsys.readouterr().out)
    assert from_cli["segments"] == python["segments"]
    assert cli.main(["predict", "--checkpoint", str(model), str(root / "feats"), "--fps", str(FPS), "--json"]) == 0
    from_folder = {r["file"]: r for r in json.loads(capsys.readouterr().out)}  # a folder: its .npy files
    assert from_folder[str(file)]["segments"] == python["segments"]
    with TestClient(create_app(localizer=pipeline.model)) as client:
        answer = client.post("/v1/video/localize", files={"file": ("v12.npy", file.read_bytes())},
                             data={"fps": str(FPS)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["segments"] == python["segments"]
        bad = client.post("/v1/video/localize", files={"file": ("x.npy", b"not an array")}, data={"fps": "8"})
        assert bad.status_code == 400 and bad.json()["detail"].startswith("x.npy:")
        assert "does not start with the .npy signature" in bad.json()["detail"]  # not "holds pickled data"
        wrong = io.BytesIO()
        np.save(wrong, np.zeros((5, DIM + 1), np.float32))
        bad = client.post("/v1/video/localize", files={"file": ("w.npy", wrong.getvalue())}, data={"fps": "8"})
        assert bad.status_code == 400 and f"(T, {DIM})" in bad.json()["detail"]
        video = client.post("/v1/video/localize", files={"file": ("clip.mp4", b"\0" * 10)})
        assert video.status_code == 400 and "--tal-encoder" in video.json()["detail"]
        video = client.post("/v1/video/localize", files={"file": ("clip.mp4", b"\0" * 10)}, data={"duration": "9"})
        assert video.status_code == 400 and "--tal-encoder" in video.json()["detail"]  # that first
        # A duration the features run past contradicts them; one past float32's range clips nothing, no overflow.
        short = client.post("/v1/video/localize", files={"file": ("v12.npy", file.read_bytes())},
                            data={"fps": str(FPS), "duration": "1e-300"})
        assert short.status_code == 422 and short.json()["error"] == "invalid_field", short.text
        assert re.match(r"duration: 1e-300 s: the \d+ features at .* expected the video's length",
                        short.json()["detail"])
        endless = client.post("/v1/video/localize", files={"file": ("v12.npy", file.read_bytes())},
                              data={"fps": str(FPS), "duration": "inf"})  # form validation lets infinity through
        assert (endless.status_code, endless.json()["detail"]) == (
            422, "duration: inf: expected a positive finite number"), endless.text
        # The features' own errors stay theirs, whatever the file is called.
        odd = client.post("/v1/video/localize", files={"file": ("take 2: duration cut.npy", b"not an array")},
                          data={"fps": str(FPS), "duration": "9"})
        assert (odd.status_code, odd.json()["error"]) == (400, "invalid_features"), odd.text
        # Fields are answered as fields, whatever the upload: a frame rate out of range, none for features (an
        # upload has no sidecar JSON; the advice to write one was of no use here).
        for data, detail in (({"fps": "1e9"}, "fps: 1000000000.0: expected a frame rate between"),
                             ({}, "fps: needed with snippet features (v12.npy): the frames per second")):
            answer = client.post("/v1/video/localize", files={"file": ("v12.npy", file.read_bytes())}, data=data)
            assert (answer.status_code, answer.json()["error"]) == (422, "invalid_field"), answer.text
            assert answer.json()["detail"].startswith(detail)
        with pytest.raises(ValueError, match=r"duration 1e-300 s: the \d+ features at"):
            pipeline(str(file), fps=FPS, duration=1e-300)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            endless = pipeline(str(file), fps=FPS, duration=1e300)
        assert [s["score"] for s in endless["segments"]] == [s["score"] for s in python["segments"]]
        empty = client.post("/v1/video/localize", files={"file": ("e.npy", b"")}, data={"fps": "8"})
        assert empty.status_code == 400 and empty.json()["detail"].startswith("e.npy:")
        header = io.BytesIO()  # a 74-byte upload whose header declares 29 TiB
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (10 ** 12, DIM)})
        huge = client.post("/v1/video/localize", files={"file": ("h.npy", header.getvalue() + bytes(64))},
                           data={"fps": "8"})
        assert huge.status_code == 400 and "declares an array far larger" in huge.json()["detail"], huge.text
        dates = io.BytesIO()
        np.save(dates, np.zeros((5, DIM), "datetime64[s]"))
        odd = client.post("/v1/video/localize", files={"file": ("d.npy", dates.getvalue())}, data={"fps": "8"})
        assert odd.status_code == 400 and "expected numbers" in odd.json()["detail"]
        # What the three doors refuse alike: non-finite features, a non-finite frame rate, a score beyond 1.
        features = np.load(file)
        nan = root / "nan.npy"
        np.save(nan, np.where(np.arange(len(features))[:, None] == 3, np.nan, features).astype(np.float32))
        integers = root / "integers.npy"  # numbers, as every door reads them
        np.save(integers, np.round(features * 100).astype(np.int64))
        as_int = pipeline(str(integers), fps=FPS)["segments"]
        assert as_int == pipeline(np.load(integers), fps=FPS)["segments"]
        answer = client.post("/v1/video/localize", files={"file": ("i.npy", integers.read_bytes())},
                             data={"fps": str(FPS)})
        assert answer.status_code == 200 and answer.json()["segments"] == as_int
        for options, culprit in (({"file": nan}, "NaN"), ({"fps": "inf"}, "inf"), ({"min_score": "2"}, "min.score"),
                                 ({"fps": "1e-40"}, "expected a frame rate between 0.001 and 100000")):
            source = options.get("file", file)
            values = {"fps": FPS, "min_score": 0.05, **{k: float(v) for k, v in options.items() if k != "file"}}
            with pytest.raises(ValueError, match=culprit):
                pipeline(str(source), **values)
            with pytest.raises(ValueError, match=culprit):
                pipeline(np.load(source), **values)
            capsys.readouterr()
            argv = ["predict", "--checkpoint", str(model), str(source), "--fps", str(values["fps"]),
                    "--min-score", str(values["min_score"])]
            try:
                code = cli.main(argv)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
            assert code in (1, 2) and re.search(culprit, capsys.readouterr().err)  # 2: a flag; 1: a file of the batch
            answer = client.post("/v1/video/localize", files={"file": ("f.npy", source.read_bytes())},
                                 data={k: str(v) for k, v in values.items()})
            assert 400 <= answer.status_code < 500 and re.search(culprit, answer.text), answer.text
    copy = root / "sidecar_inf.npy"
    copy.write_bytes(file.read_bytes())
    copy.with_suffix(".json").write_text('{"fps": Infinity}')  # Python's json reads it
    with pytest.raises(ValueError, match="sidecar_inf.npy: fps inf: expected a positive finite number"):
        pipeline(str(copy))
    with pytest.raises(ValueError, match="fps '30': expected a positive finite number"):
        pipeline(str(file), fps="30")


def test_eval_is_the_official_metric_of_the_predictions(trained, tmp_path, capsys):
    """`intern2 eval` on the model folder (task from its metadata) learns the task, and `eval-tal` on the
    predictions it writes gives the same numbers; the Python evaluation is equal too."""
    from intern2.data.temporal import open_temporal_source
    from intern2.pipelines import open_pipeline
    from intern2.tasks.tal import TIOU_PRESETS, evaluate_localizer
    root, model = trained
    out = tmp_path / "pred.json"
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(model), "--annotations", str(root / "ann.json"),
                     "--features", str(root / "feats"), "--out", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["videos"] == 4 and metrics["average_mAP"] > 0.3  # chance is near 0
    assert cli.main(["eval-tal", str(root / "ann.json"), str(out), "--json"]) == 0
    official = json.loads(capsys.readouterr().out)
    assert official["mAP"] == metrics["mAP"] and official["ap_per_class"] == metrics["ap_per_class"]
    pipeline = open_pipeline(str(model))
    source = open_temporal_source(root / "ann.json", root / "feats", "validation", pipeline.labels)
    python, _ = evaluate_localizer(pipeline.model, source, pipeline.protocol, TIOU_PRESETS["thumos14"],
                                   pipeline.labels)
    assert python["mAP"] == metrics["mAP"]
    # Official ActivityNet files name the classes only (no label_id), predictions too: the same numbers.
    names_only = json.loads((root / "ann.json").read_text())
    for video in names_only["database"].values():
        video["annotations"] = [{k: v for k, v in a.items() if k != "label_id"} for a in video["annotations"]]
    (tmp_path / "names.json").write_text(json.dumps(names_only))
    assert cli.main(["eval", "--checkpoint", str(model), "--annotations", str(tmp_path / "names.json"),
                     "--features", str(root / "feats"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == metrics["mAP"]
    results = {video: [{"label": p["label"], "score": p["scores"], "segment": p["segment"]} for p in entries]
               for video, entries in json.loads(out.read_text())["database"].items()}
    (tmp_path / "anet.json").write_text(json.dumps({"results": results}))
    assert cli.main(["eval-tal", str(tmp_path / "names.json"), str(tmp_path / "anet.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ap_per_class"] == metrics["ap_per_class"]


def test_bad_entries_are_named_skipped_and_counted(tmp_path, caplog):
    """A missing feature file, features of another dimension, a segment outside its video and an unknown class:
    one message each naming the file and entry; training still runs and reports the count."""
    from intern2.data.temporal import open_temporal_source
    root = make_features(tmp_path, videos=10)
    data = json.loads((root / "ann.json").read_text())
    database = data["database"]
    database["ghost"] = {"subset": "training", "fps": FPS, "duration": 5.0, "annotations": []}
    # No actions, and longer than max_seq_len (64): cropped like the others, not a reason to fail.
    database["quiet"] = {"subset": "training", "fps": FPS, "duration": 30.0, "annotations": []}
    np.save(root / "feats" / "quiet.npy", np.zeros((100, DIM), np.float32))
    np.save(root / "feats" / "v1.npy", np.zeros((40, DIM + 2), np.float32))
    database["v2"]["annotations"].append({"label": "run", "label_id": 1, "segment": [50.0, 60.0]})
    database["v3"]["annotations"].append({"label": "swim", "segment": [0.5, 1.0]})
    (root / "ann.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        source = open_temporal_source(root / "ann.json", root / "feats", "training", CLASSES)
    problems = "\n".join(source.problems)
    assert len(source.problems) == 4 and len(source.videos) == 6
    assert "'ghost': no feature file" in problems and "v1.npy: features of dimension 8, expected 6" in problems
    assert "'v2': annotation 1: segment [50.0, 60.0] lies outside the video" in problems
    assert "'v3': annotation 1: unknown class 'swim'" in problems
    assert all(p in caplog.text for p in source.problems)
    out = _train(root, tmp_path / "run", steps=4)
    assert (out / "model.safetensors").exists()


def test_bad_arguments_are_one_line(trained, tmp_path, capsys):
    root, model = trained
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "tal", "--set", f"annotations={root / 'ann.json'}"])
    assert stop.value.code == 2 and "set both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.main(["eval", "--checkpoint", str(model), "--annotations", str(root / "ann.json"),
                  "--features", str(tmp_path / "none")])
    assert stop.value.code == 2 and "no such folder" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 3), np.float32))
    assert cli.main(["predict", "--checkpoint", str(model), str(bad), "--fps", "8"]) == 1
    assert f"error: {bad}: features of dimension 3, expected {DIM}" in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(model), str(root / "feats" / "v0.npy")]) == 1
    assert "no frame rate" in capsys.readouterr().err


def test_builtin_features_extract_once_and_localize_videos(tmp_path, monkeypatch, capsys):
    """builtin:untrimmed extracts snippet features with the encoder (cached: a second task reuses them); a
    localizer trained on them, given that encoder, localizes in a video file as in its features."""
    pytest.importorskip("av")
    from intern2.factory import save_pretrained
    from intern2.pipelines import open_pipeline
    from intern2.tasks.tal import TALConfig, TALTask, _builtin_encoder
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path / "home"))
    cfg = TALConfig(builtin_videos=(3, 2), feat_stride=4, feat_num_frames=8)
    task = TALTask(cfg)
    assert len(task.train_source.videos) == 3 and len(task.val_source.videos) == 2
    features = task.train_source.feature_dir
    stamp = {p: p.stat().st_mtime_ns for p in features.glob("*.npy")}
    TALTask(cfg)  # a second run finds every file done
    assert {p: p.stat().st_mtime_ns for p in features.glob("*.npy")} == stamp
    encoder = _builtin_encoder(None)
    save_pretrained(encoder, tmp_path / "encoder")
    model = _train_from_task(task, tmp_path / "run")
    video = next(p for p in (Path(tmp_path / "home").rglob("val_00000.mp4")))
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(model), str(video), "--encoder", str(tmp_path / "encoder"),
                     "--min-score", "0", "--json"]) == 0
    (from_video,) = json.loads(capsys.readouterr().out)
    from_features = open_pipeline(str(model))(features / "val_00000.npy", min_score=0.0, topk=10)
    assert from_video["segments"] == from_features["segments"] and from_video["fps"] == 8.0
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from intern2 import from_pretrained
    from intern2.serve.app import create_app
    localizer = open_pipeline(str(model))
    localizer.encoder = localizer.snippet_extractor(from_pretrained(tmp_path / "encoder"))
    with TestClient(create_app(localizer=localizer)) as client:
        upload = {"file": ("clip.mp4", Path(video).read_bytes())}
        answer = client.post("/v1/video/localize", files=upload, data={"min_score": "0"})
        assert answer.status_code == 200 and answer.json()["segments"] == from_video["segments"]
        for data, status, message in (({"duration": "9"}, 400, "duration: only for snippet features"),
                                      ({"fps": "1e-40"}, 422, "fps: 1e-40: expected a frame rate between")):
            refused = client.post("/v1/video/localize", files=upload, data=data)
            assert refused.status_code == status and refused.json()["detail"].startswith(message), refused.text


def _train_from_task(task, out: Path) -> Path:
    from intern2.engine import Trainer
    from intern2.engine.trainer import TrainConfig
    task.cfg = type(task.cfg)(**{**task.cfg.__dict__, "model_args": {
        "embd_dim": 16, "fpn_dim": 16, "head_dim": 16, "arch": [2, 1, 2], "n_mha_win_size": 5, "max_seq_len": 64,
        "regression_range": [[0, 4], [4, 8], [8, 1000]]}, "train": TrainConfig(
            max_steps=2, batch_size=2, device="cpu", out_dir=str(out))})
    torch.manual_seed(0)
    Trainer(task, task.cfg.train).fit()
    return out / "model"


def test_a_broken_sidecar_is_named(trained):
    from intern2.pipelines import open_pipeline
    root, model = trained
    copy = root / "broken_side.npy"
    copy.write_bytes((root / "feats" / "v12.npy").read_bytes())
    copy.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="broken_side.json: not a readable JSON sidecar of broken_side.npy"):
        open_pipeline(str(model))(str(copy), fps=FPS)
