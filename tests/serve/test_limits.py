"""The server bounds the work of one request: a translate request beyond its step budget is refused at once, one
that runs past its time limit or outlives the server is stopped at its next decoding step, and the server then
answers a small request promptly; cross-site posts are refused."""
from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("sentencepiece")
pytest.importorskip("babel")

from fastapi.testclient import TestClient  # noqa: E402

import intern2  # noqa: E402
from intern2.pipelines.translation import Translator  # noqa: E402
from intern2.serve import allowed_hosts  # noqa: E402
from intern2.serve.app import LOOPBACK_HOSTS, check_origins, create_app  # noqa: E402
from intern2.text.corpus import builtin_sentences  # noqa: E402
from intern2.text.tokenizer import NllbTokenizer  # noqa: E402

LANGS = ["eng_Latn", "fra_Latn"]
SMALL = {"text": "Hello.", "src_lang": "en", "tgt_lang": "fr", "num_beams": 1, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def translator():
    torch.manual_seed(0)
    tokenizer = NllbTokenizer.train(builtin_sentences(LANGS), 300, LANGS)
    model = intern2.create_model("intern2_mt_tiny", vocab_size=tokenizer.vocab_size, encoder_layers=1,
                                 decoder_layers=1, max_position_embeddings=1024)
    return Translator(model, tokenizer)


def _long(sentences: int) -> dict:
    return {"text": "Good morning to you all. " * sentences, "src_lang": "en", "tgt_lang": "fr", "num_beams": 8,
            "max_new_tokens": 1024}


def test_a_request_beyond_the_step_budget_is_refused_at_once(translator):
    with TestClient(create_app(translator=translator, max_translate_steps=10_000)) as client:
        start = time.perf_counter()
        response = client.post("/v1/translate", json=_long(190))  # ~4,750 characters: inside the text limit
        assert response.status_code == 413 and response.json()["error"] == "too_much_work"
        assert "1,556,480 decoding steps x beams" in response.json()["detail"] and time.perf_counter() - start < 5
        assert client.post("/v1/translate", json=SMALL).status_code == 200


def test_a_request_past_its_time_limit_is_stopped_and_the_model_is_free_again(translator):
    with TestClient(create_app(translator=translator, max_translate_steps=10**9, max_request_seconds=0.5)) as client:
        start = time.perf_counter()
        response = client.post("/v1/translate", json=_long(40))
        stopped = time.perf_counter() - start
        assert response.status_code == 503 and response.json()["error"] == "timeout", response.text
        assert stopped < 10, stopped  # the limit plus one decoding step of 40 sentences x 8 beams
        start = time.perf_counter()
        assert client.post("/v1/translate", json=SMALL).status_code == 200
        assert time.perf_counter() - start < 5


def test_a_shutdown_stops_the_running_request(translator):
    app = create_app(translator=translator, max_translate_steps=10**9, max_request_seconds=600)
    with TestClient(app) as client:
        threading.Timer(0.5, app.state.shutdown.set).start()
        start = time.perf_counter()
        response = client.post("/v1/translate", json=_long(40))
        assert response.status_code == 503 and response.json()["error"] == "shutting_down"
        assert time.perf_counter() - start < 10


def test_sigterm_stops_a_real_server_mid_request(translator, tmp_path):
    import json
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request
    intern2.save_pretrained(translator.model, tmp_path / "mt")
    translator.tokenizer.save_pretrained(tmp_path / "mt")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "intern2.cli", "serve", "--translator", str(tmp_path / "mt"),
                               "--port", str(port), "--max-translate-steps", str(10**9), "--max-request-seconds",
                               "600", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        body = json.dumps(_long(40)).encode()
        request = urllib.request.Request(f"{url}/v1/translate", data=body, headers={"content-type": "application/json"})
        answers = []

        def post():
            try:
                answers.append(urllib.request.urlopen(request, timeout=120).status)
            except urllib.error.HTTPError as exc:
                answers.append(exc.code)
            except OSError as exc:
                answers.append(repr(exc))
        client = threading.Thread(target=post)
        client.start()
        time.sleep(1.5)  # the translation is running
        start = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        stopped = time.perf_counter() - start
        client.join(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert stopped < 10, stopped
    assert answers == [503], answers  # the running request is answered, "shutting_down"


def test_a_sentence_longer_than_the_model_takes_is_refused(translator):
    with TestClient(create_app(translator=translator)) as client:
        response = client.post("/v1/translate", json={**SMALL, "text": "word " * 900})
        assert response.status_code == 413 and response.json()["error"] == "sentence_too_long"
        assert "longer than the" in response.json()["detail"]


def test_the_cli_has_the_same_source_length_cap(translator, tmp_path, capsys):
    from intern2 import cli
    intern2.save_pretrained(translator.model, tmp_path / "mt")
    translator.tokenizer.save_pretrained(tmp_path / "mt")
    (tmp_path / "long.txt").write_text("word " * 20_000 + "\n")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        cli.main(["translate", "--model", str(tmp_path / "mt"), "--src", "en", "--tgt", "fr", "--input",
                  str(tmp_path / "long.txt"), "--output", str(tmp_path / "out.txt")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "a sentence of 80002 tokens is longer than the" in err, err
    assert time.perf_counter() - start < 30 and not (tmp_path / "out.txt").exists()


def test_cross_site_posts_are_refused_unless_allowed(translator):
    with TestClient(create_app(translator=translator, allow_origins=("https://ok.example",))) as client:
        evil = client.post("/v1/translate", json=SMALL, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and evil.json()["error"] == "cross_origin"
        assert "--allow-origin https://evil.example" in evil.json()["detail"]
        same = client.post("/v1/translate", json=SMALL, headers={"Origin": "http://testserver"})
        allowed = client.post("/v1/translate", json=SMALL, headers={"Origin": "https://ok.example"})
        assert same.status_code == allowed.status_code == 200
        assert client.get("/healthz", headers={"Origin": "https://evil.example"}).status_code == 200


def test_allowed_origins_get_cors_headers_and_loopback_hosts_are_checked(translator):
    preflight = {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    with TestClient(create_app(translator=translator, allow_origins=("https://ok.example/",))) as client:
        # The allowed site's page can send JSON (its preflight is answered) and read the answer (its header).
        answer = client.options("/v1/translate", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://ok.example"
        answer = client.post("/v1/translate", json=SMALL, headers={"Origin": "https://ok.example"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://ok.example"
        other = client.options("/v1/translate", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with TestClient(create_app(translator=translator, allow_origins=("*",))) as client:
        anyone = client.post("/v1/translate", json=SMALL, headers={"Origin": "https://any.example"})
        assert anyone.status_code == 200 and anyone.headers["access-control-allow-origin"] == "*"
    for bad in ("example.org", "https://example.org/app", "ftp://example.org", "http://user@example.org",
                "https://example.org:99999"):
        with pytest.raises(ValueError, match="allow_origins .*expected an origin, scheme://host"):
            create_app(allow_origins=(bad,))
    # As browsers send them: lower case, no default port.
    assert check_origins(("HTTPS://Example.ORG:443/", "http://[::1]:8080", "http://a.example:80")) == \
        ("https://example.org", "http://[::1]:8080", "http://a.example")
    # On a loopback address only its own names are answered: a rebinding site's Host is not one of them.
    app = create_app(translator=translator, allowed_hosts=LOOPBACK_HOSTS)
    with TestClient(app) as client:  # Host: testserver
        refused = client.get("/v1/models")
        assert refused.status_code == 403 and refused.json()["error"] == "unknown_host"
    for base in ("http://127.0.0.1:8000", "http://localhost", "http://[::1]:8000", "http://LocalHost.:8000"):
        with TestClient(app, base_url=base) as client:
            assert client.post("/v1/translate", json=SMALL).status_code == 200, base
    # What `intern2 serve` passes: the check on a loopback address or with --allow-host names, else off.
    assert allowed_hosts("127.0.0.1") == LOOPBACK_HOSTS and allowed_hosts("0.0.0.0") is None
    assert allowed_hosts("0.0.0.0", ["api.example"]) == (*LOOPBACK_HOSTS, "api.example")
    with TestClient(create_app(translator=translator, allowed_hosts=allowed_hosts("::", ["API.example"])),
                    base_url="http://api.example") as client:
        assert client.post("/v1/translate", json=SMALL).status_code == 200


def test_an_extreme_aspect_ratio_is_a_4xx_or_handled(tmp_path):
    """A 10000 x 1 image: the classifier's shorter-side resize cannot take it (422, not a 500 or a memory
    blow-up); the detector's keep-ratio resize can."""
    import io

    import numpy as np
    from PIL import Image
    backbone = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
    strip = io.BytesIO()
    Image.fromarray(np.zeros((1, 10000, 3), dtype=np.uint8)).save(strip, format="PNG")
    app = create_app(image_model=intern2.create_model("internimage_t", num_classes=3, **backbone),
                     detect_model=intern2.create_model("mask_rcnn_internimage_t", backbone=backbone, fpn_channels=16))
    with TestClient(app) as client:
        upload = {"file": ("strip.png", strip.getvalue(), "image/png")}
        classified = client.post("/v1/classify", files=upload)
        assert classified.status_code == 422 and "aspect ratio of 10000:1" in classified.json()["detail"]
        detected = client.post("/v1/detect", files=upload, data={"draw": "false"})
        assert detected.status_code == 200 and detected.json()["width"] == 10000


def test_the_api_docs_work_offline():
    with TestClient(create_app()) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "cdn" not in page.text.lower()
        script = page.text.split("swagger-ui-bundle.js")[0].rsplit('"', 1)[-1] + "swagger-ui-bundle.js"
        assert client.get(script).status_code == 200
