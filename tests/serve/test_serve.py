"""`intern2 serve`: the API through TestClient with tiny random-init models, a real uvicorn server under concurrent
requests, a fuzz pass of bad input, and the web page driven in headless Chromium."""
from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import os
import socket
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")
pytest.importorskip("sentencepiece")
pytest.importorskip("babel")
pytest.importorskip("av")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import intern2  # noqa: E402
from intern2 import cli  # noqa: E402
from intern2.data.video import write_video  # noqa: E402
from intern2.serve import load_model_spec, load_retrieval, load_translator  # noqa: E402
from intern2.pipelines.detect import mask_to_rle  # noqa: E402
from intern2.serve.app import ServeError, _Slot, create_app  # noqa: E402
from intern2.tasks.translation import Translator  # noqa: E402
from browser import CHROMIUM, DevTools  # noqa: E402
from intern2.text.corpus import builtin_sentences  # noqa: E402
from intern2.text.tokenizer import NllbTokenizer  # noqa: E402

BACKBONE = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
LANGS = ["eng_Latn", "fra_Latn", "deu_Latn"]
IMAGE_CLASSES = ["cat", "dog", "bird"]
CAPTIONS = ["a red circle moves to the right", "a blue square turns", "a green star fades in"]


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models():
    """Tiny random-init models for every slot, small inputs so each request takes milliseconds."""
    torch.manual_seed(0)
    image = intern2.create_model("internimage_t", num_classes=3, **BACKBONE)
    image.pretrained_cfg.update(input_size=(3, 64, 64), label_names=IMAGE_CLASSES)
    detect = intern2.create_model("mask_rcnn_internimage_t", backbone=BACKBONE, fpn_channels=32, num_classes=2,
                                  min_size=64, max_size=96, box_detections_per_img=5, box_score_thresh=0.0)
    detect.pretrained_cfg["label_names"] = ["circle", "square"]
    segment = intern2.create_model("upernet_internimage_t", backbone=BACKBONE, channels=16, aux_channels=16,
                                   num_classes=4)
    segment.pretrained_cfg["test_size"] = (96, 64)
    video = intern2.create_model("videomae_vit_s", embed_dim=32, depth=1, num_heads=2, patch_size=16, img_size=32,
                                 all_frames=4, num_classes=3)
    video.pretrained_cfg.update(num_frames=4, stride=1, input_size=(3, 4, 32, 32))
    tokenizer = NllbTokenizer.train(builtin_sentences(LANGS), 300, LANGS)
    translator = intern2.create_model("intern2_mt_tiny", vocab_size=tokenizer.vocab_size, encoder_layers=1,
                                      decoder_layers=1)
    found = dict(image_model=image, detect_model=detect, segment_model=segment, video_model=video,
                 translator=Translator(translator, tokenizer))
    if _has("tokenizers"):
        from intern2.text.bpe import BPETokenizer
        retrieval = intern2.create_model("internvideo_mm_tiny", num_frames=4)
        found["retrieval"] = (retrieval, BPETokenizer.train(CAPTIONS, vocab_size=300, context_length=32))
    return found


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(**models)) as test_client:
        yield test_client


def _png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring a huge canvas, with almost no pixel data: a decompression bomb's
    header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory) -> bytes:
    frames = np.random.default_rng(0).integers(0, 255, (12, 32, 48, 3), dtype=np.uint8)
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames).read_bytes()


def _upload(name: str, data: bytes, kind: str = "image/png"):
    return {"file": (name, data, kind)}


def _decode_png(base64_text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(base64_text)))


# ------------------------------------------------------------------------------------------------- API
def test_health_models_schema_and_page(client, models):
    assert client.get("/healthz").json()["status"] == "ok"
    listed = client.get("/v1/models").json()["models"]
    assert listed["image"]["labels"] == IMAGE_CLASSES and listed["image"]["loaded"]
    assert listed["translator"]["languages"] == LANGS
    assert listed["retrieval"]["loaded"] == ("retrieval" in models)
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    # Errors are documented as what the server sends ({"error", "detail"}), not FastAPI's {"detail": [...]}.
    assert "HTTPValidationError" not in json.dumps(schema)
    for path in ("/v1/classify", "/v1/translate", "/v1/video/localize"):
        for status in ("400", "413", "422", "503"):
            assert paths[path]["post"]["responses"][status]["content"]["application/json"]["schema"]["$ref"] \
                == "#/components/schemas/ErrorBody", (path, status)
    assert {"/healthz", "/v1/models", "/v1/classify", "/v1/detect", "/v1/segment", "/v1/video/classify",
            "/v1/video/retrieve", "/v1/translate"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/no/such/path").json()["error"] == "not_found"


def test_classify_top_k(client):
    response = client.post("/v1/classify", files=_upload("a.png", _png()), data={"topk": 2})
    assert response.status_code == 200, response.text
    top = response.json()["top"]
    assert len(top) == 2 and {t["label"] for t in top} <= set(IMAGE_CLASSES)
    assert top[0]["prob"] >= top[1]["prob"] and all(IMAGE_CLASSES[t["index"]] == t["label"] for t in top)
    everything = client.post("/v1/classify", files=_upload("a.png", _png()), data={"topk": 50}).json()["top"]
    assert len(everything) == 3 and abs(sum(t["prob"] for t in everything) - 1) < 1e-4
    assert client.post("/v1/classify", files=_upload("a.png", _png()), data={"topk": 0}).status_code == 422


def test_exif_orientation_is_applied_by_every_door(client, models, tmp_path, capsys):
    """A phone photo stored 64 x 48 with EXIF orientation 6 (shown 48 x 64) is read upright by the server, the
    CLI and the Python pipeline alike (the server answered 64 x 48 and drew its overlay sideways)."""
    from intern2.pipelines.detect import DetectionPipeline
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, format="JPEG", exif=exif)
    served = client.post("/v1/detect", files=_upload("phone.jpg", path.read_bytes()), data={"threshold": 0.0})
    assert served.status_code == 200, served.text
    assert (served.json()["width"], served.json()["height"]) == (48, 64)
    intern2.save_pretrained(models["detect_model"], tmp_path / "detector")
    assert cli.main(["predict", str(path), "--checkpoint", str(tmp_path / "detector"), "--json",
                     "--threshold", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]
    python = DetectionPipeline(models["detect_model"])(str(path), threshold=0.0)
    boxes = [o["box"] for o in served.json()["objects"]]
    assert len(boxes) == len(printed["objects"]) == len(python["objects"]) > 0
    for door in (printed, python):  # the CLI rounds to 0.1 pixel
        assert np.allclose([o["box"] for o in door["objects"]], boxes, atol=0.051)


def test_detect_boxes_masks_and_drawing(client):
    response = client.post("/v1/detect", files=_upload("a.png", _png()), data={"threshold": 0.0, "masks": "true"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["width"], result["height"]) == (64, 48) and 0 < len(result["objects"]) <= 5
    for obj in result["objects"]:
        assert obj["label"] in ("circle", "square") and 0 <= obj["score"] <= 1
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 48
        assert obj["mask"]["size"] == [48, 64] and sum(obj["mask"]["counts"]) == 48 * 64
    assert _decode_png(result["overlay_png"]).size == (64, 48)
    bare = client.post("/v1/detect", files=_upload("a.png", _png()),
                       data={"threshold": 1.0, "draw": "false"}).json()
    assert bare["objects"] == [] and "overlay_png" not in bare
    default = client.post("/v1/detect", files=_upload("a.png", _png()), data={"threshold": 0.0}).json()
    assert default["objects"] and all("mask" not in obj for obj in default["objects"])  # as pipeline() and predict


@pytest.mark.parametrize("seed", range(3))
def test_mask_rle_is_coco_rle(seed):
    mask = np.random.default_rng(seed).random((7, 5)) > 0.5
    mask[0, 0] = seed == 1  # runs must start with zeros, also when the first pixel is set
    rle = mask_to_rle(mask)
    flat = np.concatenate([np.full(n, i % 2, dtype=bool) for i, n in enumerate(rle["counts"])])
    assert np.array_equal(flat.reshape(5, 7).T, mask)
    mask_utils = pytest.importorskip("pycocotools.mask")
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, 7, 5)), mask)


def test_segment_histogram_overlay_and_mask(client):
    response = client.post("/v1/segment", files=_upload("a.png", _png()), data={"include_mask": "true"})
    assert response.status_code == 200, response.text
    result = response.json()
    fractions = [c["fraction"] for c in result["classes"]]
    assert abs(sum(fractions) - 1) < 1e-4 and fractions == sorted(fractions, reverse=True)
    assert all(c["colour"].startswith("#") and len(c["colour"]) == 7 for c in result["classes"])
    assert _decode_png(result["overlay_png"]).size == (64, 48)
    mask = np.asarray(_decode_png(result["mask_png"]))
    assert mask.shape == (48, 64) and set(np.unique(mask).tolist()) == {c["index"] for c in result["classes"]}


def test_video_classify_and_retrieve(client, models, video_bytes):
    response = client.post("/v1/video/classify", files=_upload("clip.mp4", video_bytes, "video/mp4"),
                           data={"topk": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["top"]) == 2
    if "retrieval" not in models:
        pytest.skip("the video-text tokenizer needs the 'tokenizers' package")
    texts = "\n".join(CAPTIONS) + "\n\n"
    response = client.post("/v1/video/retrieve", files=_upload("clip.mp4", video_bytes, "video/mp4"),
                           data={"texts": texts})
    assert response.status_code == 200, response.text
    ranking = response.json()["ranking"]
    assert sorted(r["text"] for r in ranking) == sorted(CAPTIONS)
    assert [r["similarity"] for r in ranking] == sorted((r["similarity"] for r in ranking), reverse=True)
    empty = client.post("/v1/video/retrieve", files=_upload("clip.mp4", video_bytes, "video/mp4"),
                        data={"texts": " \n "})
    assert empty.status_code == 400 and empty.json()["error"] == "empty_text"


def test_video_frame_pixel_limit(models, video_bytes):
    with TestClient(create_app(video_model=models["video_model"], max_frame_pixels=1000)) as client:
        response = client.post("/v1/video/classify", files=_upload("clip.mp4", video_bytes, "video/mp4"))
    assert response.status_code == 413 and response.json()["error"] == "video_too_large"
    assert "48 x 32" in response.json()["detail"]


def test_translate_and_language_errors(client):
    response = client.post("/v1/translate", json={"text": "Hello. How are you?", "src_lang": "en",
                                                  "tgt_lang": "French"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert isinstance(result["translation"], str)
    assert (result["src_lang"], result["tgt_lang"]) == ("eng_Latn", "fra_Latn")
    unknown = client.post("/v1/translate", json={"text": "Hi", "src_lang": "en", "tgt_lang": "klingonx"})
    assert unknown.status_code == 422 and unknown.json()["error"] == "unknown_language"
    assert "tgt_lang" in unknown.json()["detail"] and "tlh_Latn" in unknown.json()["suggestions"]
    missing = client.post("/v1/translate", json={"text": "Hi", "src_lang": "ja", "tgt_lang": "fr"})
    assert missing.status_code == 422 and missing.json()["error"] == "unsupported_language"
    for body, status, code in [
        ({"text": " \n", "src_lang": "en", "tgt_lang": "fr"}, 400, "empty_text"),
        ({"text": "x" * 6000, "src_lang": "en", "tgt_lang": "fr"}, 413, "text_too_long"),
        ({"text": "Hi", "src_lang": "en", "tgt_lang": "fr", "num_beams": 0}, 422, "invalid_request"),
        ({"text": "Hi", "src_lang": "en"}, 422, "invalid_request"),
    ]:
        response = client.post("/v1/translate", json=body)
        assert (response.status_code, response.json()["error"]) == (status, code), response.text


def test_bad_requests_are_4xx_naming_the_field(client):
    cases = [  # (path, request, status, text the detail must contain)
        ("/v1/classify", dict(files=_upload("a.png", _png()), data={"topk": 0}), 422, "topk"),
        ("/v1/classify", dict(files=_upload("a.png", _png()), data={"topk": "abc"}), 422, "topk"),
        ("/v1/classify", dict(data={"topk": 3}), 422, "file"),
        ("/v1/detect", dict(files=_upload("a.png", _png()), data={"threshold": 2}), 422, "threshold"),
        ("/v1/classify", dict(files=_upload("x" * 10_000 + ".png", _png())), 400, "the file name too"),
        ("/v1/classify", dict(files=_upload("notes.png", b"plain text")), 400, "notes.png"),
        # one field twice: FastAPI alone would keep one of the two silently
        ("/v1/classify", dict(files=[("file", ("a.png", _png(), "image/png")),
                                     ("file", ("b.png", _png(seed=1), "image/png"))]),
         400, "file: given more than once"),
        ("/v1/segment", dict(files=[("file", ("a.png", _png(), "image/png")), ("include_mask", (None, "true")),
                                    ("include_mask", (None, "false"))]), 400, "include_mask"),
        ("/v1/translate", dict(json={"text": "Hi", "src_lang": "en", "tgt_lang": "fr", "num_beams": 0}), 422,
         "num_beams"),
        ("/v1/translate", dict(json={"text": "Hi", "src_lang": "en"}), 422, "tgt_lang"),
        ("/v1/translate", dict(json={"text": 5, "src_lang": "en", "tgt_lang": "fr"}), 422, "text"),
        # a field the endpoint does not take is named, not silently ignored (the answer had the default topk)
        ("/v1/classify", dict(files=_upload("a.png", _png()), data={"top_k": 1}), 400,
         "top_k: not a field of this endpoint; it takes file, topk"),
        ("/v1/classify?topk=1", dict(files=_upload("a.png", _png())), 400, "topk: sent in the URL's query"),
        ("/v1/translate?num_beams=2", dict(json={"text": "Hi", "src_lang": "en", "tgt_lang": "fr"}), 400,
         "num_beams: sent in the URL's query; send it in the request body (text, src_lang, tgt_lang, num_beams, "
         "max_new_tokens)"),
        ("/v1/translate", dict(json={"text": "Hi", "src_lang": "en", "tgt_lang": "fr", "beams": 3}), 422, "beams"),
        ("/v1/translate", dict(json={"text": "Hi", "src_lang": "en", "tgt_lang": "fr", "num_beams": True}), 422,
         "num_beams"),
        ("/v1/translate", dict(json={"text": "Hi", "src_lang": "en", "tgt_lang": "fr", "num_beams": "2"}), 422,
         "num_beams"),
        ("/v1/classify", dict(files={"file": ("", _png(), "image/png")}), 422, "file: expected a file upload"),
        # JSON without its header: FastAPI did not parse it and said "body: Input should be a valid dictionary"
        ("/v1/translate", dict(content=b'{"text": "Hi", "src_lang": "en", "tgt_lang": "fr"}',
                               headers={"content-type": "text/plain"}), 415,
         "/v1/translate: expected a JSON body sent with Content-Type: application/json, got text/plain"),
        ("/v1/translate", dict(content=b'{"text": "Hi"}'), 415, "got no Content-Type"),
        # a syntax error's position is a character, not a field ("body.15")
        ("/v1/translate", dict(content=b'{"text": "Hi", ', headers={"content-type": "application/json"}), 422,
         "body: not valid JSON at character 15 (Expecting property name"),
        ("/v1/translate", dict(json=["Hi", "en", "fr"]), 422, "body: expected a JSON object"),
    ]
    for path, request, status, culprit in cases:
        response = client.post(path, **request)
        assert response.status_code == status and culprit in response.json()["detail"], (path, response.text)


def test_models_lists_at_most_100_labels_and_says_how_many_are_left_out():
    """Only real names in ``labels`` (a "... 30 more" entry there read as a class), the rest counted beside."""
    names = [f"class {i}" for i in range(130)]
    model = intern2.create_model("internimage_t", num_classes=130, **BACKBONE)
    model.pretrained_cfg["label_names"] = names
    with TestClient(create_app(image_model=model)) as client:
        listed = client.get("/v1/models").json()["models"]["image"]
    assert (listed["num_classes"], listed["labels"], listed["labels_left_out"]) == (130, names[:100], 30)


def test_health_probes_may_use_head_and_a_wrong_method_says_which_are_allowed():
    with TestClient(create_app()) as empty:
        for path in ("/healthz", "/v1/models", "/"):
            assert empty.head(path).status_code == 200, path
        wrong = empty.put("/v1/classify")
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"


def test_models_not_loaded_answer_503():
    with TestClient(create_app()) as empty:
        assert empty.get("/v1/models").json()["models"]["image"] == {"loaded": False, "flag": "--image-model"}
        for path in ("/v1/classify", "/v1/detect", "/v1/segment", "/v1/video/classify"):
            response = empty.post(path, files=_upload("a.png", _png()))
            assert response.status_code == 503 and response.json()["error"] == "model_not_loaded"
        response = empty.post("/v1/translate", json={"text": "Hi", "src_lang": "en", "tgt_lang": "fr"})
        assert response.status_code == 503 and "--translator" in response.json()["detail"]


def test_wrong_model_for_a_slot_fails_at_start(models):
    with pytest.raises(TypeError, match="image_model: .*expected an image classifier.*got InternImageMaskRCNN"):
        create_app(image_model=models["detect_model"])
    with pytest.raises(TypeError, match="translator"):
        create_app(translator=models["image_model"])
    # A video model without a classifier (a pre-training run, num_classes=0) used to answer every request with a 500.
    for encoder in (intern2.create_model("videomae_pretrain_vit_s", img_size=32, patch_size=16, encoder_depth=1,
                                         decoder_depth=1, all_frames=4),
                    intern2.create_model("videomae_vit_s", embed_dim=32, depth=1, num_heads=2, patch_size=16,
                                         img_size=32, all_frames=4, num_classes=0)):
        with pytest.raises(TypeError, match="video_model: .*has no classifier"):
            create_app(video_model=encoder)
    detector = copy.deepcopy(models["detect_model"]).to(torch.bfloat16)  # detection runs in float32 only
    with pytest.raises(ValueError, match="detect_model: .*float32 only, the model is in bfloat16"):
        create_app(detect_model=detector)


def test_models_list_the_dtype_source_and_int8_parameters(models):
    translator = models["translator"]
    int8 = Translator(translator.model.quantize_dynamic(), translator.tokenizer, source="mt-folder")
    with TestClient(create_app(translator=translator, image_model=models["image_model"])) as client:
        fp32 = client.get("/v1/models").json()["models"]
    with TestClient(create_app(translator=int8)) as client:
        quantised = client.get("/v1/models").json()["models"]["translator"]
    assert fp32["translator"]["dtype"] == fp32["image"]["dtype"] == "float32" and quantised["dtype"] == "int8"
    # The packed int8 weights count (they were left out: 502,400 -> 40,832); the output projection is its own int8
    # copy of the tied embedding, so it counts once more.
    assert fp32["translator"]["parameters"] == sum(p.numel() for p in translator.model.parameters())
    assert quantised["parameters"] == fp32["translator"]["parameters"] + int8.model.lm_head.weight().numel()
    assert quantised["source"] == "mt-folder"


def test_queue_is_bounded():
    """Requests beyond max_waiting get a 503 at once instead of piling up (and holding their uploads)."""
    import anyio
    release = threading.Event()
    slot = _Slot("image", None, max_waiting=2)

    async def scenario():
        async with anyio.create_task_group() as group:
            for _ in range(2):
                group.start_soon(slot.run, release.wait)
            await anyio.sleep(0.05)
            with pytest.raises(ServeError) as caught:
                await slot.run(release.wait)
            release.set()
        return caught.value

    error = anyio.run(scenario)
    assert (error.status, error.code) == (503, "busy") and slot.waiting == 0


# ------------------------------------------------------------------------------------------------- bad input
def test_fuzz_bad_inputs_are_4xx_and_leave_no_files(models, video_bytes, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # uploads spool and land here: count them
    created = []
    named_temporary_file = tempfile.NamedTemporaryFile

    def recording(*args, **kwargs):
        handle = named_temporary_file(*args, **kwargs)
        created.append(handle.name)
        return handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", recording)
    rng = np.random.default_rng(1)
    valid = _png()
    image_cases = [rng.bytes(int(n)) for n in rng.integers(1, 5000, 8)] + [
        b"", valid[:len(valid) // 2], b"GIF89a" + rng.bytes(100), b"\xff\xd8\xff\xe0" + rng.bytes(200),
        _png_header_only(8000, 8000),  # under PIL's own bomb limit, over the server's pixel limit
        _png_header_only(60000, 60000),  # over PIL's bomb limit
    ]
    video_cases = [rng.bytes(int(n)) for n in rng.integers(1, 5000, 4)] + [
        b"", video_bytes[:len(video_bytes) // 3], video_bytes[:200], b"\0" * 4096]  # (FFmpeg reads a PNG as a
    # one-frame video, so an image is not bad input here)
    with TestClient(create_app(**models, max_upload_mb=1)) as client:
        for data in image_cases:
            for path in ("/v1/classify", "/v1/detect", "/v1/segment"):
                response = client.post(path, files=_upload("junk.png", data))
                assert 400 <= response.status_code < 500, (path, data[:20], response.text)
                assert response.json()["error"] in ("invalid_image", "image_too_large")
        for data in video_cases:
            response = client.post("/v1/video/classify", files=_upload("junk.mp4", data, "video/mp4"))
            assert response.status_code == 400 and response.json()["error"] == "invalid_video", response.text
            assert "junk.mp4" in response.json()["detail"] and str(scratch) not in response.json()["detail"]
        huge = client.post("/v1/classify", files=_upload("huge.png", _png_header_only(8000, 8000)))
        assert huge.status_code == 413 and "8000 x 8000" in huge.json()["detail"]
        requests = [
            dict(content=b'{"text": "\xff\xfe\xfd", "src_lang": "en", "tgt_lang": "fr"}'),  # invalid UTF-8
            dict(content=b'{"text": "Hi", "src_lang": '),  # truncated JSON
            dict(content=b"[1, 2, 3]"),
            dict(content=rng.bytes(300)),
        ]
        for request in requests:
            response = client.post("/v1/translate", headers={"content-type": "application/json"}, **request)
            assert response.status_code in (400, 422), response.text
        assert client.post("/v1/classify", data={"topk": 3}).status_code == 422  # no file
        assert client.post("/v1/classify", content=rng.bytes(500),
                           headers={"content-type": "multipart/form-data; boundary=xyz"}).status_code in (400, 422)
        too_big = client.post("/v1/classify", files=_upload("big.png", rng.bytes(2 * 2 ** 20)))
        assert too_big.status_code == 413 and too_big.json()["error"] == "payload_too_large"
        streamed = client.post("/v1/classify", content=(rng.bytes(2 ** 16) for _ in range(40)),
                               headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert streamed.status_code == 413  # no Content-Length: counted while it streams in
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/classify", files=_upload("a.png", valid)).status_code == 200
    assert len(created) >= len(video_cases) - 1 and all(Path(name).parent == scratch for name in created)
    assert list(scratch.iterdir()) == []


# ------------------------------------------------------------------------------------------------- real server
@contextlib.contextmanager
def _server(app, limit_s: float = 120.0):
    """uvicorn on 127.0.0.1 on a free port, in a thread; a watchdog stops it after ``limit_s`` whatever happens."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    watchdog = threading.Timer(limit_s, lambda: setattr(server, "should_exit", True))
    watchdog.daemon = True
    thread.start()
    watchdog.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        watchdog.cancel()
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads memory use from /proc")
def test_uvicorn_concurrent_requests(models):
    png, junk = _png(), np.random.default_rng(2).bytes(3000)

    def call(base: str, index: int):
        with httpx.Client(base_url=base, timeout=60) as http:
            kind = index % 4
            if kind == 0:
                response = http.post("/v1/classify", files=_upload("a.png", png))
            elif kind == 1:
                response = http.post("/v1/translate", json={"text": f"Monday {index}.", "src_lang": "en",
                                                            "tgt_lang": "de"})
            elif kind == 2:
                response = http.post("/v1/segment", files=_upload("junk.png", junk))
            else:
                response = http.get("/healthz")
            return kind, response.status_code

    expected = {0: 200, 1: 200, 2: 400, 3: 200}
    with _server(create_app(**models)) as base:
        start = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            assert all(status == expected[kind] for kind, status in pool.map(lambda i: call(base, i), range(24)))
        before = _rss_mb()
        with ThreadPoolExecutor(6) as pool:
            assert all(status == expected[kind] for kind, status in pool.map(lambda i: call(base, i), range(48)))
        assert _rss_mb() - before < 200, "memory grew under repeated requests"
        assert time.monotonic() - start < 60
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200


def test_inference_is_off_the_event_loop_and_one_at_a_time(models):
    """While a classification is stuck in the model, /healthz still answers, and a second classification waits for
    the first instead of running the same model concurrently."""
    entered, release = threading.Event(), threading.Event()
    active, most = [0], [0]
    lock = threading.Lock()

    def hold(module, inputs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        entered.set()
        release.wait(timeout=30)
        with lock:
            active[0] -= 1

    handle = models["image_model"].register_forward_pre_hook(hold)
    try:
        with _server(create_app(**models)) as base, ThreadPoolExecutor(3) as pool:
            def classify():
                return httpx.post(f"{base}/v1/classify", files=_upload("a.png", _png()), timeout=60).status_code
            pending = [pool.submit(classify) for _ in range(3)]
            assert entered.wait(timeout=30)
            start = time.monotonic()
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
            assert time.monotonic() - start < 2
            release.set()
            assert [future.result(timeout=60) for future in pending] == [200, 200, 200]
    finally:
        handle.remove()
        release.set()
    assert most[0] == 1


# ------------------------------------------------------------------------------------------------- web page
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                             "`make test` installs it when run as root)")
def test_page_in_headless_chromium(models, video_bytes, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(_png(80, 60))
    video = tmp_path / "clip.mp4"
    video.write_bytes(video_bytes)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with _server(create_app(**models)) as base:
        browser = DevTools(CHROMIUM, tmp_path / "profile")
        try:
            browser.call("Target.getTargets")  # the pipe is up
            browser.open(base + "/")
            browser.wait_for("document.body && document.body.dataset.ready === 'true'")
            assert "models loaded" in browser.evaluate("document.getElementById('status').textContent")

            browser.upload("#classify input[type=file]", image)
            assert browser.submit("classify") == "done"
            labels = browser.evaluate("[...document.querySelectorAll('#classify .bar-label')]"
                                      ".map(e => e.textContent)")
            assert len(labels) == 3 and set(labels) == set(IMAGE_CLASSES)

            browser.upload("#segment input[type=file]", image)
            assert browser.submit("segment") == "done"
            assert browser.wait_for("document.querySelector('#segment img.drawing').complete && "
                                    "document.querySelector('#segment img.drawing').naturalWidth") == 80

            browser.upload("#detect input[type=file]", image)
            assert browser.submit("detect") == "done"
            assert browser.wait_for("document.querySelector('#detect img.drawing').naturalHeight") == 60

            browser.upload("#video input[type=file]", video)
            assert browser.submit("video") == "done"
            assert browser.evaluate("document.querySelectorAll('#video .bar-row').length") == 3

            if "retrieval" in models:
                browser.upload("#retrieve input[type=file]", video)
                captions = json.dumps("\n".join(CAPTIONS))
                browser.evaluate(f"document.querySelector('#retrieve textarea').value = {captions}")
                assert browser.submit("retrieve") == "done"
                ranked = browser.evaluate("[...document.querySelectorAll('#retrieve .caption')]"
                                          ".map(e => e.textContent)")
                assert sorted(ranked) == sorted(CAPTIONS)

            browser.evaluate("document.querySelector('#translate textarea').value = 'Good morning.'")
            assert browser.submit("translate") == "done"
            assert "eng_Latn → fra_Latn" in browser.evaluate("document.querySelector('#translate .timing')"
                                                             ".textContent")
            # The page leaves beams at the model's default: its answer is the API's (it sent num_beams=1).
            api = httpx.post(base + "/v1/translate", json={"text": "Good morning.", "src_lang": "eng_Latn",
                                                           "tgt_lang": "fra_Latn"}, timeout=60).json()
            assert browser.evaluate("document.querySelector('#translate .translation').textContent") == \
                api["translation"]
            status = browser.evaluate("document.getElementById('status').textContent")
            cards = browser.evaluate("document.querySelectorAll('.card').length")
            assert cards == 7 and f"of {cards} models loaded" in status  # one card per endpoint, localize too

            browser.upload("#classify input[type=file]", junk)
            assert browser.submit("classify") == "error"
            assert "not an image" in browser.evaluate("document.querySelector('#classify .error').textContent")
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------------- CLI
def test_serve_cli_arguments(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0 and "--image-model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["serve", "--image-model", "no_such_model"])
    assert "no_such_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--translator", str(tmp_path / "missing")])
    assert "missing" in capsys.readouterr().err
    with socket.socket() as taken:  # an address in use is refused before minutes of model loading
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, message in ((["--port", port, "--image-model", "no_such_model"], f"--port {port}: cannot listen"),
                              (["--allow-origin", "example.org"], "--allow-origin 'example.org': expected an origin"),
                              (["--int8"], "--int8 quantises the translator: give --translator"),
                              (["--image-model", ""], "--image-model: empty"),
                              (["--port", "\u0663"], "expected a port number")):
            with pytest.raises(SystemExit) as exit_info:
                cli.main(["serve", *argv])
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert exit_info.value.code == 2 and message in err, (argv, err)
    intern2.save_pretrained(models["image_model"], tmp_path / "image")
    loaded = load_model_spec(str(tmp_path / "image"))
    assert loaded.pretrained_cfg["label_names"] == IMAGE_CLASSES and not loaded.training
    models["translator"].model.save_pretrained(tmp_path / "mt")
    models["translator"].tokenizer.save_pretrained(tmp_path / "mt")
    assert load_translator(str(tmp_path / "mt")).tokenizer.languages == LANGS
    if "retrieval" in models:
        model, tokenizer = models["retrieval"]
        intern2.save_pretrained(model, tmp_path / "vt")
        tokenizer.save(tmp_path / "vt")
        create_app(retrieval=load_retrieval(str(tmp_path / "vt")))
