"""One answer per model: the same input through the Python pipeline, `intern2 predict --json` (or the family's
command) and the HTTP endpoint gives the same labels (names and indices) and scores, for every family."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

import intern2  # noqa: E402
from intern2 import cli  # noqa: E402
from intern2.pipelines import open_pipeline  # noqa: E402
from intern2.serve import load_model_spec, load_retrieval, load_translator  # noqa: E402
from intern2.serve.app import create_app  # noqa: E402

BACKBONE = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
CLASSES = ["cat", "dog", "bird"]
CAPTIONS = ["a red circle moves to the right", "a blue square turns", "a green star fades in"]
VIDEO = dict(embed_dim=32, depth=1, num_heads=2, patch_size=16, img_size=32, all_frames=4, num_classes=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    image = root / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    pytest.importorskip("av")
    from intern2.data.video import write_video
    video = write_video(root / "clip.mp4", np.random.default_rng(1).integers(0, 255, (12, 32, 48, 3), dtype=np.uint8))
    return {"image": str(image), "video": str(video)}


def _folder(tmp_path, name: str, model) -> str:
    intern2.save_pretrained(model, tmp_path / name)
    return str(tmp_path / name)


def _predict_json(capsys, argv) -> list:
    capsys.readouterr()
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _post(app_kwargs, path, **request):
    with TestClient(create_app(**app_kwargs)) as client:
        response = client.post(path, **request)
    assert response.status_code == 200, response.text
    return response.json()


def _same_ranking(*rankings, key="prob", atol=1e-6):
    first = rankings[0]
    for other in rankings[1:]:
        assert [(r["label"], r["index"]) for r in other] == [(r["label"], r["index"]) for r in first]
        assert np.allclose([r[key] for r in other], [r[key] for r in first], atol=atol, rtol=0)


def test_image_classification(tmp_path, inputs, capsys):
    torch.manual_seed(0)
    model = intern2.create_model("internimage_t", num_classes=3, **BACKBONE)
    model.pretrained_cfg.update(input_size=(3, 64, 64), label_names=CLASSES)
    folder = _folder(tmp_path, "image", model)
    from intern2.pipelines.image_cls import ImageClassificationPipeline
    python = ImageClassificationPipeline.from_pretrained(folder)(inputs["image"], topk=3)["top"]
    (cli_result,) = _predict_json(capsys, ["predict", inputs["image"], "--checkpoint", folder, "--topk", "3", "--json",
                                           "--device", "cpu"])
    http = _post(dict(image_model=load_model_spec(folder)), "/v1/classify", data={"topk": 3},
                 files={"file": ("image.png", open(inputs["image"], "rb").read(), "image/png")})["top"]
    _same_ranking(python, cli_result["top"], http)
    assert {r["label"] for r in python} == set(CLASSES) and all(CLASSES[r["index"]] == r["label"] for r in python)


DETECTORS = {"mask_rcnn_internimage_t": dict(fpn_channels=32, box_detections_per_img=5, box_score_thresh=0.0),
             "cascade_mask_rcnn_internimage_l": dict(fpn_channels=32, box_detections_per_img=5, box_score_thresh=0.0),
             "dino_4scale_internimage_t": dict(embed_dims=32, num_query=20, max_per_img=5, num_feats=16, neck_groups=8,
                                               num_encoder_layers=1, num_decoder_layers=1, feedforward_channels=64)}


@pytest.mark.parametrize("architecture", list(DETECTORS))
def test_detection(tmp_path, inputs, capsys, architecture):
    torch.manual_seed(0)
    model = intern2.create_model(architecture, backbone=BACKBONE, num_classes=2, min_size=64, max_size=96,
                                 **DETECTORS[architecture])
    model.pretrained_cfg["label_names"] = ["circle", "square"]
    folder = _folder(tmp_path, "detect", model)
    from intern2.pipelines.detect import DetectionPipeline
    pipeline = DetectionPipeline.from_pretrained(folder)
    python = pipeline(inputs["image"], threshold=0.0, masks=True)["objects"]
    for bad in ("0.5", 2, float("nan"), True):  # NaN and 2 used to return nothing, "0.5" a torch TypeError
        with pytest.raises(ValueError, match=r"threshold .*: expected a score in \[0, 1\]"):
            pipeline(inputs["image"], threshold=bad)
    (cli_result,) = _predict_json(capsys, ["predict", inputs["image"], "--checkpoint", folder, "--threshold", "0",
                                           "--masks", "--out", str(tmp_path / "drawn"), "--json"])
    http = _post(dict(detect_model=load_model_spec(folder)), "/v1/detect",
                 data={"threshold": 0.0, "masks": "true", "draw": "false"},
                 files={"file": ("image.png", open(inputs["image"], "rb").read(), "image/png")})["objects"]
    assert python, "a random detector with score threshold 0 still detects"
    _same_ranking(python, cli_result["objects"], http, key="score")
    assert [o["box"] for o in python] == [o["box"] for o in cli_result["objects"]] == [o["box"] for o in http]
    masks = [[o.get("mask") for o in objects] for objects in (python, cli_result["objects"], http)]
    assert masks[0] == masks[1] == masks[2] and (None in masks[0]) == architecture.startswith("dino_")
    assert all(["circle", "square"][o["index"]] == o["label"] for o in python)
    # The doors' defaults agree too: no masks unless asked for.
    plain = DetectionPipeline.from_pretrained(folder)(inputs["image"], threshold=0.0)["objects"]
    (plain_cli,) = _predict_json(capsys, ["predict", inputs["image"], "--checkpoint", folder, "--threshold", "0",
                                          "--json"])
    plain_http = _post(dict(detect_model=load_model_spec(folder)), "/v1/detect", data={"threshold": 0.0},
                       files={"file": ("image.png", open(inputs["image"], "rb").read(), "image/png")})["objects"]
    assert not any("mask" in o for objects in (plain, plain_cli["objects"], plain_http) for o in objects)


SEGMENTORS = {"upernet_internimage_t": dict(backbone=BACKBONE, channels=16, aux_channels=16),
              "mask2former_internimage_h": dict(backbone=dict(BACKBONE, level2_post_norm_block_ids=None),
                                                feat_channels=32, num_queries=8, num_heads=4, num_decoder_layers=2,
                                                decoder_feedforward=64, num_encoder_layers=1, encoder_feedforward=64,
                                                num_feats=16, groups=8)}


@pytest.mark.parametrize("architecture", list(SEGMENTORS))
def test_segmentation(tmp_path, inputs, capsys, architecture):
    torch.manual_seed(0)
    model = intern2.create_model(architecture, num_classes=4, **SEGMENTORS[architecture])
    model.pretrained_cfg.update(label_names=["sky", "road", "tree", "car"], test_size=[96, 64])
    folder = _folder(tmp_path, "segment", model)
    from intern2.pipelines.segment import SegmentationPipeline
    python = SegmentationPipeline.from_pretrained(folder)(inputs["image"])["classes"]
    (cli_result,) = _predict_json(capsys, ["predict", inputs["image"], "--checkpoint", folder,
                                           "--out", str(tmp_path / "masks"), "--json"])
    http = _post(dict(segment_model=load_model_spec(folder)), "/v1/segment",
                 files={"file": ("image.png", open(inputs["image"], "rb").read(), "image/png")})["classes"]
    # Class shares count argmax pixels: probabilities equal to the last bits may still break a near-tie of a
    # random model differently, so a share may move by one pixel (1 / 3072 here), never more.
    _same_ranking(python, cli_result["classes"], http, key="fraction", atol=1 / (48 * 64) + 1e-6)
    assert [c["colour"] for c in python] == [c["colour"] for c in http]


def test_video_classification(tmp_path, inputs, capsys):
    torch.manual_seed(0)
    model = intern2.create_model("videomae_vit_s", **VIDEO)
    model.pretrained_cfg.update(stride=1, test_clips=2, test_crops=3, label_names=CLASSES)
    folder = _folder(tmp_path, "video", model)
    from intern2.pipelines.video_cls import VideoClassificationPipeline
    python = VideoClassificationPipeline.from_pretrained(folder)(inputs["video"], topk=3)["top"]
    (cli_result,) = _predict_json(capsys, ["predict", inputs["video"], "--checkpoint", folder, "--topk", "3", "--json"])
    http = _post(dict(video_model=load_model_spec(folder)), "/v1/video/classify", data={"topk": 3},
                 files={"file": ("clip.mp4", open(inputs["video"], "rb").read(), "video/mp4")})["top"]
    _same_ranking(python, cli_result["top"], http)


def test_video_text(tmp_path, inputs, capsys):
    pytest.importorskip("tokenizers")
    from intern2.pipelines.video_text import VideoTextPipeline
    from intern2.text.bpe import BPETokenizer
    torch.manual_seed(0)
    model = intern2.create_model("internvideo_mm_tiny", num_frames=4)
    folder = _folder(tmp_path, "vt", model)
    BPETokenizer.train(CAPTIONS, vocab_size=300, context_length=32).save(folder)
    python = VideoTextPipeline.from_pretrained(folder).rank_captions(inputs["video"], CAPTIONS)["ranking"]
    python = [{"label": r["text"], "index": r["index"], "prob": r["prob"]} for r in python]
    (cli_result,) = _predict_json(capsys, ["zero-shot", inputs["video"], "--checkpoint", folder, "--labels",
                                           ",".join(CAPTIONS), "--prompt", "{}", "--json"])
    http = _post(dict(retrieval=load_retrieval(folder)), "/v1/video/retrieve", data={"texts": "\n".join(CAPTIONS)},
                 files={"file": ("clip.mp4", open(inputs["video"], "rb").read(), "video/mp4")})["ranking"]
    http = [{"label": r["text"], "index": r["index"], "prob": r["prob"]} for r in http]
    # --labels-file: one name per line, so a name may hold a comma
    labels_file = tmp_path / "captions.txt"
    labels_file.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    (from_file,) = _predict_json(capsys, ["zero-shot", inputs["video"], "--checkpoint", folder, "--labels-file",
                                          str(labels_file), "--prompt", "{}", "--json"])
    _same_ranking(python, cli_result["top"], from_file["top"], http)
    labels_file.write_text("\n".join(CAPTIONS + ["a circle, then a square"]), encoding="utf-8")
    (with_comma,) = _predict_json(capsys, ["zero-shot", inputs["video"], "--checkpoint", folder, "--labels-file",
                                           str(labels_file), "--json"])
    assert {r["label"] for r in with_comma["top"]} == {*CAPTIONS, "a circle, then a square"}


def test_translation(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    pytest.importorskip("babel")
    from intern2.pipelines.translation import Translator
    from intern2.text.corpus import builtin_sentences
    from intern2.text.tokenizer import NllbTokenizer
    langs = ["eng_Latn", "fra_Latn"]
    torch.manual_seed(0)
    tokenizer = NllbTokenizer.train(builtin_sentences(langs), 300, langs)
    model = intern2.create_model("intern2_mt_tiny", vocab_size=tokenizer.vocab_size, encoder_layers=1,
                                 decoder_layers=1)
    folder = tmp_path / "mt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = "Good morning. See you tomorrow!"
    (python,) = Translator.from_pretrained(folder).translate([text], "eng_Latn", "fra_Latn", max_new_tokens=8)
    opened = open_pipeline(str(folder))  # an HF-layout folder: its config.json says only model_type m2m_100
    assert isinstance(opened, Translator)
    assert opened.translate([text], "eng_Latn", "fra_Latn", max_new_tokens=8) == [python]
    for kwargs, error, message in [
        (dict(texts=text), TypeError, "texts: expected a list of texts, got one str"),
        (dict(batch_size=-1), ValueError, "batch_size: expected a positive integer, got -1"),
        (dict(num_beams=0), ValueError, "num_beams"),  # not silently the default
        (dict(max_new_tokens=10 ** 12), ValueError, "max_new_tokens: expected 1 to"),
    ]:
        with pytest.raises(error, match=message):
            opened.translate(**{"texts": [text], "src_lang": "eng_Latn", "tgt_lang": "fra_Latn", **kwargs})
    with pytest.raises(ValueError, match="int8=True and dtype='bf16': choose one"):
        Translator.from_pretrained(folder, int8=True, dtype="bf16")
    capsys.readouterr()
    assert cli.main(["translate", "--model", str(folder), "--src", "en", "--tgt", "French", "--max-new-tokens", "8",
                     text]) == 0
    from_cli = capsys.readouterr().out.rstrip("\n")
    http = _post(dict(translator=load_translator(str(folder))), "/v1/translate",
                 json={"text": text, "src_lang": "en", "tgt_lang": "fra_Latn", "max_new_tokens": 8})["translation"]
    assert python == from_cli == http
    # Text that is not Unicode (bytes that were not UTF-8: a lone surrogate) is refused alike by every door,
    # naming the character, where sentencepiece would fail with an error that names nothing.
    bad = "bad \udcff text"
    with pytest.raises(ValueError, match=r"texts\[0\]: not valid Unicode text: '\\udcff' at character 4"):
        Translator.from_pretrained(folder).translate([bad], "eng_Latn", "fra_Latn")
    with pytest.raises(SystemExit) as exited:
        cli.main(["translate", "--model", str(folder), "--src", "en", "--tgt", "fr", bad])
    assert exited.value.code == 2 and "text 1: not valid Unicode text" in capsys.readouterr().err
    with TestClient(create_app(translator=load_translator(str(folder)))) as client:
        response = client.post("/v1/translate", headers={"content-type": "application/json"},
                               content=b'{"text": "bad \\udcff text", "src_lang": "en", "tgt_lang": "fr"}')
    assert response.status_code == 400 and response.json()["error"] == "invalid_text", response.text
    # An existing --output file is replaced (atomically), not refused.
    output = tmp_path / "out.txt"
    output.write_text("an earlier translation\n")
    (tmp_path / "in.txt").write_text(text + "\n")
    assert cli.main(["translate", "--model", str(folder), "--src", "en", "--tgt", "fr", "--max-new-tokens", "8",
                     "--input", str(tmp_path / "in.txt"), "--output", str(output)]) == 0
    assert output.read_text() == python + "\n"
    (tmp_path / "long.txt").write_text("Hello.\n" + "word " * 400 + "\n")
    with pytest.raises(SystemExit) as exited:  # named by its line, before any decoding; the output is kept
        cli.main(["translate", "--model", str(folder), "--src", "en", "--tgt", "fr", "--input",
                  str(tmp_path / "long.txt"), "--output", str(output)])
    assert exited.value.code == 2 and "long.txt line 2: a sentence of" in capsys.readouterr().err
    assert output.read_text() == python + "\n"
