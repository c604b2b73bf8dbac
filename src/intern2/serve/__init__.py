"""`intern2 serve`: an HTTP API and a web page in front of the image, video and translation models.

:func:`intern2.serve.app.create_app` builds the app (it needs the ``serve`` extra: FastAPI, uvicorn,
python-multipart); this module holds the command line and the model loading and imports neither, so
``intern2 serve --help`` works without them.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ["main", "allowed_hosts", "load_model_spec", "load_translator", "load_retrieval", "DEFAULT_MAX_UPLOAD_MB",
           "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_FRAME_PIXELS", "DEFAULT_MAX_TRANSLATE_STEPS",
           "DEFAULT_MAX_REQUEST_SECONDS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 50.0
# 40 megapixels: a phone photo fits; a decompression bomb (a tiny file declaring a huge canvas) does not.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Video frames are decoded a clip at a time (16 frames and more): 4K UHD is the largest frame by default.
DEFAULT_MAX_FRAME_PIXELS = 3840 * 2160
DEFAULT_MAX_TRANSLATE_STEPS = 50_000  # decoding steps x beams per translate request
DEFAULT_MAX_REQUEST_SECONDS = 60.0

SPEC_HELP = ("a model folder (config.json + weights) or a Hub repo of one (owner/name), or a registered model name "
             "optionally followed by :WEIGHTS")


def load_model_spec(spec: str, flag: Optional[str] = None) -> Any:
    """A model from ``FOLDER``, a Hub repo (``owner/name``), ``NAME`` (random weights: for trying the API) or
    ``NAME:WEIGHTS_FILE``; errors name ``flag``."""
    from ..pipelines.common import load_model_spec as load
    return load(spec, flag)


def load_translator(folder: str, int8: bool = False, dtype: Optional[str] = None) -> Any:
    """A :class:`~intern2.pipelines.translation.Translator` from a model folder holding the tokenizer too (written
    by `intern2 train translation`, or a Hugging Face NLLB folder)."""
    from ..pipelines.translation import Translator
    return Translator.from_pretrained(folder, int8=int8, dtype=dtype, flag="--translator")


def load_retrieval(folder: str, dtype: Optional[str] = None) -> Any:
    """A :class:`~intern2.pipelines.video_text.VideoTextPipeline` from a folder written by `intern2 train
    video-text` (with tokenizer.json), or a Hub repo of one."""
    from ..hub import hub_repo, local_folder
    from ..pipelines.video_text import VideoTextPipeline
    if not Path(folder).is_dir() and not hub_repo(folder):
        raise FileNotFoundError(f"--retrieval-model {folder}: expected a video-text model folder (config.json, "
                                f"weights and tokenizer.json)")
    with local_folder(folder, "--retrieval-model") as local:
        return VideoTextPipeline.from_pretrained(str(local), dtype=dtype)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return int(text)


def main(argv: Optional[List[str]] = None) -> int:
    """`intern2 serve [--host H] [--port P] [--image-model SPEC] ... [--translator FOLDER]`."""
    from ..pipelines.common import positive
    parser = argparse.ArgumentParser(
        prog="intern2 serve", description="Serve the models over HTTP (JSON API, OpenAPI schema at /openapi.json, "
        "web page at /). Models are loaded once, at start; endpoints of models not given answer 503.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (0: any free port)")
    parser.add_argument("--image-model", metavar="SPEC", help=f"image classifier: {SPEC_HELP}")
    parser.add_argument("--detect-model", metavar="SPEC",
                        help=f"Mask R-CNN, Cascade Mask R-CNN or DINO detector: {SPEC_HELP}")
    parser.add_argument("--segment-model", metavar="SPEC", help=f"UperNet segmentor: {SPEC_HELP}")
    parser.add_argument("--video-model", metavar="SPEC", help=f"video classifier: {SPEC_HELP}")
    parser.add_argument("--retrieval-model", metavar="FOLDER",
                        help="video-text model folder (with its tokenizer.json), or a Hub repo of one, for "
                        "/v1/video/retrieve")
    parser.add_argument("--translator", metavar="FOLDER",
                        help="translation model folder with its tokenizer (NLLB/M2M-100 layout), or a Hub repo of "
                        "one (facebook/nllb-200-distilled-600M)")
    parser.add_argument("--tal-model", metavar="SPEC", help=f"temporal action localizer: {SPEC_HELP}")
    parser.add_argument("--tal-encoder", metavar="SPEC", help="the video model whose snippet features the localizer "
                        "reads: then /v1/video/localize also takes videos")
    parser.add_argument("--int8", action="store_true", help="int8 dynamic quantisation of the translator (CPU)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="run the image, segmentation, video, retrieval "
                        "and translation models in bfloat16 (detection and localization stay fp32; a CPU without "
                        "bfloat16 instructions falls back to fp32 and says so)")
    parser.add_argument("--max-upload-mb", type=positive(float), default=DEFAULT_MAX_UPLOAD_MB,
                        help="largest request body, in MB (default %(default)s)")
    parser.add_argument("--max-image-pixels", type=positive(int), default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="largest image, in pixels (default %(default)s)")
    parser.add_argument("--max-frame-pixels", type=positive(int), default=DEFAULT_MAX_FRAME_PIXELS,
                        help="largest video frame, in pixels (default %(default)s: 4K UHD)")
    parser.add_argument("--max-translate-steps", type=positive(int), default=DEFAULT_MAX_TRANSLATE_STEPS,
                        help="most decoding steps x beams one translate request may need (default %(default)s)")
    parser.add_argument("--max-request-seconds", type=positive(float), default=DEFAULT_MAX_REQUEST_SECONDS,
                        help="a translate request still decoding after this is stopped (default %(default)s)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a site whose pages may post to this server, e.g. https://example.org (repeatable; "
                        "by default cross-site posts are refused)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name clients reach this server under (repeatable): only these and the loopback "
                        "names are answered, against DNS rebinding; on a loopback --host the check is always on")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = parser.parse_args(argv)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        parser.error(f"serving needs FastAPI, uvicorn and python-multipart: pip install 'intern2[serve]' ({exc})")
    from .app import check_origins
    for flag in ("image_model", "detect_model", "segment_model", "video_model", "retrieval_model", "translator",
                 "tal_model", "tal_encoder"):
        if getattr(args, flag) == "":
            parser.error(f"--{flag.replace('_', '-')}: empty; expected {SPEC_HELP}")
    if args.int8 and not args.translator:
        parser.error("--int8 quantises the translator: give --translator FOLDER too")
    try:
        origins = check_origins(tuple(args.allow_origin), "--allow-origin")
        _check_address(args.host, args.port)  # before minutes of model loading
    except ValueError as exc:
        parser.error(str(exc))
    from ..config import error_message
    from ..pipelines.common import setup_logging
    setup_logging()
    models = {}
    try:
        if args.int8 and args.dtype == "bf16":
            raise ValueError("--int8 and --dtype bf16: choose one (int8 layers take float32 activations)")
        for flag in ("image_model", "detect_model", "segment_model", "video_model"):
            if getattr(args, flag):
                models[flag] = load_model_spec(getattr(args, flag), "--" + flag.replace("_", "-"))
                if args.dtype and flag != "detect_model":
                    from ..pipelines.common import inference_dtype
                    model = models[flag]
                    models[flag] = model.to(inference_dtype(args.dtype, next(model.parameters()).device))
        if args.retrieval_model:
            models["retrieval"] = load_retrieval(args.retrieval_model, args.dtype)
        if args.translator:
            models["translator"] = load_translator(args.translator, args.int8, args.dtype)
        if args.tal_encoder and not args.tal_model:
            raise ValueError("--tal-encoder needs --tal-model (the localizer that reads its features)")
        if args.tal_model:
            from ..pipelines.tal import TemporalLocalizationPipeline
            localizer = TemporalLocalizationPipeline(load_model_spec(args.tal_model, "--tal-model"),
                                                     source=args.tal_model)
            if args.tal_encoder:
                localizer.encoder = localizer.snippet_extractor(load_model_spec(args.tal_encoder, "--tal-encoder"),
                                                                args.tal_encoder)
            models["localizer"] = localizer
        app = create_app(**models, max_upload_mb=args.max_upload_mb, max_image_pixels=args.max_image_pixels,
                         max_frame_pixels=args.max_frame_pixels, max_translate_steps=args.max_translate_steps,
                         max_request_seconds=args.max_request_seconds, allow_origins=origins,
                         allowed_hosts=allowed_hosts(args.host, args.allow_host))
    except (ValueError, TypeError, FileNotFoundError, KeyError, ImportError) as exc:
        parser.error(error_message(exc))
    if not models:
        log.warning("no model given: every endpoint but /healthz and /v1/models answers 503 (see --help)")
    _graceful(uvicorn.Server)(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)).run()
    return 0


def allowed_hosts(host: str, names: Sequence[str] = ()) -> Optional[Tuple[str, ...]]:
    """The Host names a server listening on ``host`` answers as: on a loopback address, or with ``names``
    (``--allow-host``), the loopback names, ``host`` and ``names``; else None (any: a server on every interface is
    reached under names it cannot know)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not (loopback or names):
        return None
    from .app import LOOPBACK_HOSTS
    return tuple(dict.fromkeys((*LOOPBACK_HOSTS, *((host,) if loopback else ()), *names)))


def _check_address(host: str, port: int) -> None:
    """A ValueError naming --host / --port when the server could not listen there (in use, not this machine's):
    every address the name resolves to is tried, as asyncio binds them all (an IPv6 address on a machine
    without IPv6 is skipped, as asyncio skips it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: not an address or a name this machine resolves ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                    continue
                raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def _graceful(server_class: type) -> type:
    """uvicorn's server that, on SIGTERM / SIGINT, also stops the requests running in the model threads at their
    next step (``app.state.shutdown``); plain uvicorn waits for them, and a long translation held shutdown for
    minutes. (Made on use: uvicorn is an optional extra.)"""
    class GracefulServer(server_class):
        def handle_exit(self, sig, frame):
            self.config.app.state.shutdown.set()
            super().handle_exit(sig, frame)
    return GracefulServer

