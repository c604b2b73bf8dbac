"""The FastAPI app behind `intern2 serve`: one JSON endpoint per model, the web page at ``/``.

Every endpoint is a thin layer over a pipeline (:mod:`intern2.pipelines`): the server decodes uploads and
formats JSON; labels, preprocessing and post-processing are the pipeline's, so an answer here equals the one
`intern2 predict --json` and the Python API give. Models (or pipelines) are handed to :func:`create_app` once.
Each runs in a worker thread, one request at a time (a capacity limiter of one is its lock), behind a bounded
queue, so the event loop keeps answering ``/healthz`` while a model works and concurrent requests never run one
model twice at once. Bad input is a 4xx
JSON error ``{"error": code, "detail": message}``, never a stack trace or a dead server.
"""
from __future__ import annotations

import asyncio
import base64
import inspect
import io
import shutil
import tempfile
import threading
import time
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import anyio
import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import (DEFAULT_MAX_FRAME_PIXELS, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_SECONDS,
               DEFAULT_MAX_TRANSLATE_STEPS, DEFAULT_MAX_UPLOAD_MB)
from ..text import check_text

if TYPE_CHECKING:
    from ..pipelines import Pipeline

__all__ = ["create_app", "ServeError", "check_origins", "LOOPBACK_HOSTS"]

DEFAULT_MAX_TEXT_CHARS = 5000
# One translate request's work is bounded by decoding steps x beams over its sentences (Translator.decoding_steps)
# and by a wall-clock limit: beyond either it is refused (413) or stopped (503), and the model is free again.
STATIC = Path(__file__).parent / "static"
SLOTS = ("image", "detect", "segment", "video", "retrieval", "translator", "localizer")
FLAGS = {"image": "--image-model", "detect": "--detect-model", "segment": "--segment-model",
         "video": "--video-model", "retrieval": "--retrieval-model", "translator": "--translator",
         "localizer": "--tal-model"}
MAX_CAPTIONS = 200


class ServeError(Exception):
    """An error answered as ``{"error": code, "detail": message, **extra}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": message, **extra}, status_code=status)


def _fields_of(request: Request) -> List[str]:
    """The endpoint's own parameter names (its form fields, or its JSON body's fields)."""
    endpoint = request.scope["endpoint"]
    names = []
    for name, parameter in inspect.signature(endpoint, eval_str=True).parameters.items():  # postponed annotations
        annotation = parameter.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.extend(annotation.model_fields)
        elif annotation is not Request:
            names.append(name)
    return names


async def _query_free(request: Request) -> None:
    """400 for URL query parameters: every endpoint takes its fields in the body, and FastAPI would silently
    ignore ``?topk=1``."""
    if request.query_params:
        given = ", ".join(sorted(set(request.query_params.keys())))
        raise ServeError(400, "unknown_field", f"{given}: sent in the URL's query; send "
                         f"{'it' if ',' not in given else 'them'} in the request body "
                         f"({', '.join(_fields_of(request))})")


async def _checked_form(request: Request) -> None:
    """400 for a form that gives one field twice (two files, two topk), or a field the endpoint does not take
    (``top_k``): FastAPI would silently keep one of them, or ignore it. Starlette keeps the parsed form on the
    request, so this reads nothing the endpoint does not."""
    await _query_free(request)
    form = await request.form()
    repeated = sorted({name for name in form.keys() if len(form.getlist(name)) > 1})
    if repeated:
        raise ServeError(400, "repeated_field", f"{', '.join(repeated)}: given more than once; send one per request")
    known = _fields_of(request)
    unknown = sorted(set(form.keys()) - set(known))
    if unknown:
        raise ServeError(400, "unknown_field", f"{', '.join(unknown)}: not a field of this endpoint; it takes "
                         f"{', '.join(known)}")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_origins(origins: Tuple[str, ...], name: str = "allow_origins") -> Tuple[str, ...]:
    """``origins`` as browsers send them in an Origin header (``scheme://host[:port]``, lower case, without a
    default port or a trailing slash), or ``*`` (any site); a ValueError naming one that is no origin."""
    checked = []
    for origin in origins:
        if origin == "*":
            checked.append(origin)
            continue
        try:
            parts = urllib.parse.urlsplit(origin.strip())
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (parts is None or parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc
                or parts.path not in ("", "/") or parts.query or parts.fragment):
            raise ValueError(f"{name} {origin!r}: expected an origin, scheme://host[:port] such as "
                             f"https://example.org (no path), or '*' for any site")
        scheme, host = parts.scheme.lower(), parts.hostname.lower()
        host = f"[{host}]" if ":" in host else host
        checked.append(f"{scheme}://{host}" + (f":{port}" if port not in (None, _DEFAULT_PORTS[scheme]) else ""))
    return tuple(checked)


def _hostname(host: str) -> str:
    """The name in a Host header, without its port, in lower case (``[::1]:8000`` -> ``::1``, ``Localhost.`` ->
    ``localhost``)."""
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.lower().rstrip(".")


class _SameOrigin:
    """403 for state-changing requests from another site: a page elsewhere must not make a browser post to this
    server (a form POST needs no CORS preflight). The server's own page (same host) and non-browser clients (no
    Origin header) pass; ``allowed`` origins (``--allow-origin``; ``*``: all) too. With ``hosts`` (a server on a
    loopback address), a request whose Host header is another name is refused: a site that rebinds its own name
    to 127.0.0.1 would otherwise be "same origin"."""

    def __init__(self, app: ASGIApp, allowed: Tuple[str, ...] = (), hosts: Optional[Tuple[str, ...]] = None):
        self.app, self.allowed, self.hosts = app, allowed, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if _hostname(host) not in self.hosts:
                await _error(403, "unknown_host", f"Host {host!r}: this server answers only as "
                             f"{' / '.join(self.hosts)} (start it with --allow-host NAME to add a name)")(
                    scope, receive, send)
                return
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS") and "*" not in self.allowed:
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/")
            host = headers.get(b"host", b"").decode("latin-1")
            if origin and origin not in self.allowed and origin.split("://", 1)[-1] != host:
                await _error(403, "cross_origin", f"requests from {origin} are refused; start the server with "
                             f"--allow-origin {origin} to accept them")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """413 for request bodies over ``max_bytes``: at once from Content-Length, else while the body streams in,
    so an oversized upload is never read into memory or spooled to disk."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"request body is larger than the server's limit of {self.max_bytes / 2 ** 20:g} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _error(413, "payload_too_large", self._message())(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI re-raises HTTPExceptions from body parsing as they are (other errors become a 400).
                raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)


@dataclass
class _Slot:
    """A loaded model and the limiter that lets one request at a time run it; ``waiting`` bounds the queue."""
    name: str
    model: Any
    max_waiting: int
    limiter: Optional[anyio.CapacityLimiter] = None
    waiting: int = 0
    info: Dict[str, Any] = field(default_factory=dict)

    async def run(self, function: Callable, *args: Any) -> Any:
        if self.limiter is None:  # served without a lifespan (which gives each event loop its own limiter)
            self.limiter = anyio.CapacityLimiter(1)
        if self.waiting >= self.max_waiting:
            raise ServeError(503, "busy", f"the {self.name} model has {self.waiting} requests waiting; retry later")
        self.waiting += 1
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)
        finally:
            self.waiting -= 1


# --------------------------------------------------------------------------------------------------- decoding
def _decode_image(data: bytes, filename: str, max_pixels: int) -> Image.Image:
    """RGB image from uploaded bytes, upright (EXIF orientation, as files read by the other doors); the pixel
    count is checked from the header, before any decoding."""
    from ..data.images import upright_rgb
    if not data:
        raise ServeError(400, "invalid_image", f"{filename}: the upload is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ServeError(413, "image_too_large", f"{filename}: {width} x {height} pixels is more than the "
                                 f"server's limit of {max_pixels:,} pixels")
            img.load()
            return upright_rgb(img)
    except ServeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ServeError(413, "image_too_large", f"{filename}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ServeError(400, "invalid_image", f"{filename}: not an image in a format PIL can read") from exc
    except Exception as exc:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error...) on junk
        raise ServeError(400, "invalid_image", f"{filename}: not a readable image "
                         f"({exc.__class__.__name__}: {exc})") from exc


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -------------------------------------------------------------------------------------------------- inference
@torch.inference_mode()
def _classify(pipeline: Pipeline, image: Image.Image, topk: int) -> Dict[str, Any]:
    return pipeline(image, topk)


@torch.inference_mode()
def _detect(pipeline: Pipeline, image: Image.Image, threshold: float, masks: bool, draw: bool) -> Dict[str, Any]:
    result = pipeline(image, threshold, masks)
    output = result.pop("output")
    if draw:
        result["overlay_png"] = _png_base64(pipeline.draw(image, output, threshold))
    return result


@torch.inference_mode()
def _segment(pipeline: Pipeline, image: Image.Image, include_mask: bool) -> Dict[str, Any]:
    from ..pipelines.segment import colourise
    result = pipeline(image)
    prediction = result.pop("prediction")
    result["overlay_png"] = _png_base64(colourise(image, prediction))
    if include_mask:  # class index per pixel, as an 8- or 16-bit greyscale PNG
        result["mask_png"] = _png_base64(pipeline.mask_image(prediction))
    return result


def _video_upload(upload: UploadFile, work: Callable[[str], Dict[str, Any]], max_pixels: int) -> Dict[str, Any]:
    """Copy an upload into a named temporary file (PyAV reads from a path), run ``work`` on it, always delete it;
    decoding errors name the uploaded file, not the temporary one."""
    import av

    from ..data.video import probe_video
    from ..pipelines.video_cls import VIDEO_SUFFIXES
    filename = upload.filename or "upload"
    suffix = Path(filename).suffix.lower()
    with tempfile.NamedTemporaryFile(prefix="intern2-upload-", suffix=suffix if suffix in VIDEO_SUFFIXES else "") \
            as tmp:
        upload.file.seek(0)
        shutil.copyfileobj(upload.file, tmp)
        tmp.flush()
        if tmp.tell() == 0:
            raise ServeError(400, "invalid_video", f"{filename}: the upload is empty")
        try:
            info = probe_video(tmp.name)
            if info.width * info.height > max_pixels:
                raise ServeError(413, "video_too_large", f"{filename}: {info.width} x {info.height} frames are "
                                 f"more than the server's limit of {max_pixels:,} pixels")
            return work(tmp.name)
        except (ValueError, av.FFmpegError) as exc:  # VideoDecodeError, bad frame ranges: the file, not the server
            raise ServeError(400, "invalid_video", str(exc).replace(tmp.name, filename)) from exc


@torch.inference_mode()
def _classify_video(pipeline: Pipeline, path: str, topk: int) -> Dict[str, Any]:
    return pipeline(path, topk)


def _localize(pipeline: Pipeline, data: bytes, filename: str, fps: Optional[float], duration: Optional[float],
              min_score: float, topk: int) -> Dict[str, Any]:
    """Snippet features uploaded as a .npy (T, C) array: the localizer's segments."""
    import io

    from ..data.temporal import load_npy
    from ..pipelines.tal import RateError
    try:
        return pipeline(load_npy(io.BytesIO(data), filename), fps=fps, duration=duration, min_score=min_score,
                        topk=topk)
    except RateError as exc:  # a given duration the features run past (fps was checked before the upload)
        raise ServeError(422, "invalid_field", f"{exc.field}: {exc.detail}") from None
    except ValueError as exc:  # not an .npy array, a wrong shape
        message = str(exc)
        raise ServeError(400, "invalid_features", message if message.startswith(filename) else
                         f"{filename}: {message}") from None


@torch.inference_mode()
def _retrieve(pipeline: Pipeline, path: str, captions: List[str], topk: int) -> Dict[str, Any]:
    return pipeline.rank_captions(path, captions, topk)


def _translate(translator: Any, text: str, src_lang: str, tgt_lang: str, num_beams: Optional[int],
               max_new_tokens: Optional[int], stop: Callable[[], None]) -> Dict[str, Any]:
    (translation,) = translator.translate([text], src_lang, tgt_lang, num_beams=num_beams,
                                          max_new_tokens=max_new_tokens, stop=stop)
    return {"translation": translation}


def _stopper(cancelled: threading.Event, shutdown: threading.Event, seconds: float) -> Callable[[], None]:
    """What generation calls before every step: it ends the work of a request whose client left, that ran past
    ``seconds``, or that a shutting-down server abandons."""
    deadline = time.monotonic() + seconds

    def stop() -> None:
        if shutdown.is_set():
            raise ServeError(503, "shutting_down", "the server is shutting down; retry elsewhere or later")
        if cancelled.is_set():
            raise ServeError(499, "cancelled", "the client closed the connection")
        if time.monotonic() > deadline:
            raise ServeError(503, "timeout", f"the request ran past the server's limit of {seconds:g} s: send less "
                             f"text, fewer beams or fewer new tokens")
    return stop


async def _while_connected(request: Request, cancelled: threading.Event, work: Callable[[], Any]) -> Any:
    """Run ``work`` (awaitable) and set ``cancelled`` as soon as the client disconnects."""
    async def watch() -> None:
        while not cancelled.is_set():
            if await request.is_disconnected():
                cancelled.set()
                return
            await anyio.sleep(0.2)
    watcher = asyncio.ensure_future(watch())  # a task, not a task group: errors of ``work`` stay unwrapped
    try:
        return await work()
    finally:
        cancelled.set()
        watcher.cancel()


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("beams") is an error, not a silent default

    text: str = Field(description="text to translate; long text is split into sentences")
    src_lang: str = Field(description="source language: any registered code or name ('en', 'eng_Latn', 'English')")
    tgt_lang: str = Field(description="target language, as src_lang")
    num_beams: Optional[int] = Field(None, ge=1, le=8, strict=True,
                                     description="beam size (1: greedy; default: the model's)")
    max_new_tokens: Optional[int] = Field(None, ge=1, le=1024, strict=True,
                                          description="per sentence; default from its length")


class ErrorBody(BaseModel):
    """What every 4xx / 5xx answer holds."""
    error: str = Field(description="a short code: invalid_image, payload_too_large, model_not_loaded, ...")
    detail: str = Field(description="one line naming the field or file and what was expected")


ERRORS: Dict[Any, Dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad input: an unreadable upload, an unknown or repeated field"},
    403: {"model": ErrorBody, "description": "a cross-site request, or a request under another host name"},
    413: {"model": ErrorBody, "description": "more than the server's limits (body, pixels, text, work)"},
    415: {"model": ErrorBody, "description": "a JSON body sent without Content-Type: application/json"},
    422: {"model": ErrorBody, "description": "a field of the wrong type or range, or input the model cannot take"},
    503: {"model": ErrorBody, "description": "the model is not loaded, busy, or the request ran past its time"},
}


# ------------------------------------------------------------------------------------------------------- app
_PIPELINES = {"image": "image-cls", "detect": "detect", "segment": "segment", "video": "video-cls",
              "retrieval": "video-text", "translator": "translation", "localizer": "tal"}


def _pipeline(slot: str, model: Any) -> Pipeline:
    """The slot's pipeline around ``model`` (a model, a pipeline, or for retrieval a (model, tokenizer) pair);
    a model of the wrong kind fails here, at start, rather than on every request."""
    from ..pipelines import Pipeline, pipeline_class
    cls = pipeline_class(_PIPELINES[slot])
    name = slot if slot in ("translator", "retrieval") else f"{slot}_model"
    if isinstance(model, Pipeline):
        if not isinstance(model, cls):
            raise TypeError(f"{name}: expected a {cls.__name__}, got a {type(model).__name__}")
        return _with_classifier(slot, name, model)
    try:
        if slot in ("retrieval", "translator"):
            if not (isinstance(model, tuple) and len(model) == 2):
                raise TypeError(f"expected a {cls.__name__} or a (model, tokenizer) pair, got {type(model).__name__}")
            return cls(model[0], model[1])
        pipeline = cls(model)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    return _with_classifier(slot, name, pipeline)


def _with_classifier(slot: str, name: str, pipeline: Pipeline) -> Pipeline:
    """A classification slot's pipeline must have labels: a pre-training or ``num_classes=0`` model would
    answer every request with a 500."""
    if slot in ("image", "video") and not pipeline.labels:
        raise TypeError(f"{name}: {pipeline.source or type(pipeline.model).__name__} has no classifier (a "
                        f"pre-training or num_classes=0 model); serve a {slot} classifier")
    return pipeline


def _describe(pipeline: Pipeline) -> Dict[str, Any]:
    from ..pipelines.common import model_dtype
    module = pipeline.model
    int8 = [m for m in module.modules() if _is_int8(m)]
    info = {"architecture": getattr(module, "pretrained_cfg", {}).get("architecture", type(module).__name__),
            "source": pipeline.source,
            # int8 dynamic Linears keep their packed weights outside parameters()
            "parameters": sum(p.numel() for p in module.parameters())
            + sum(m.weight().numel() + (m.bias().numel() if m.bias() is not None else 0) for m in int8),
            "dtype": "int8" if int8 else str(model_dtype(module)).removeprefix("torch.")}
    if pipeline.task == "translation":
        return {**info, "languages": pipeline.tokenizer.languages}
    if pipeline.task == "video-text":
        return info
    if pipeline.task == "tal":
        info = {**info, "videos": pipeline.encoder is not None, **pipeline.protocol.to_cfg()}
    labels = pipeline.labels  # the first 100 (21,841 ImageNet-22k names would be half a megabyte per listing)
    return {**info, "num_classes": len(labels), "labels": labels[:100],
            **({"labels_left_out": len(labels) - 100} if len(labels) > 100 else {})}


def _is_int8(module: Any) -> bool:
    from ..models.translator import DynamicQuantizedLinear
    return isinstance(module, DynamicQuantizedLinear)


def create_app(image_model: Any = None, detect_model: Any = None, segment_model: Any = None, video_model: Any = None,
               translator: Any = None, retrieval: Any = None, localizer: Any = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
               max_text_chars: int = DEFAULT_MAX_TEXT_CHARS, max_waiting: int = 16,
               max_translate_steps: int = DEFAULT_MAX_TRANSLATE_STEPS,
               max_request_seconds: float = DEFAULT_MAX_REQUEST_SECONDS,
               allow_origins: Tuple[str, ...] = (), allowed_hosts: Optional[Tuple[str, ...]] = None) -> FastAPI:
    """The intern2 HTTP API and web page for the given models (any may be None: its endpoints answer 503).

    Args:
        image_model: an InternImage classifier; detect_model: an InternImage (Cascade) Mask R-CNN;
            segment_model: an UperNet; video_model: a video ViT classifier (each a model, used in eval mode, or
            its pipeline).
        translator: a :class:`~intern2.pipelines.translation.Translator` (or a (model, tokenizer) pair);
            retrieval: a :class:`~intern2.pipelines.video_text.VideoTextPipeline` (or ``(VideoTextModel,
            BPETokenizer)``); localizer: a temporal action localizer or its
            :class:`~intern2.pipelines.tal.TemporalLocalizationPipeline` (with an ``encoder``, it also takes videos).
        max_upload_mb: largest request body; max_image_pixels: largest image, in pixels; max_frame_pixels:
            largest video frame; max_text_chars: longest text to translate; max_waiting: requests queued per model
            before 503s.
        max_translate_steps: most decoding steps x beams one translate request may need (413 beyond);
            max_request_seconds: a translate request still decoding after this is stopped (503); both bound the
            time one request holds the translator. ``app.state.shutdown`` (a threading.Event) stops running
            requests at their next step, for a prompt shutdown.
        allow_origins: other sites whose pages may use this server (``scheme://host[:port]``, or ``*``: any);
            their requests get CORS headers and preflights, all other sites' posts a 403.
        allowed_hosts: the only Host names answered, against DNS rebinding (`intern2 serve` passes
            :data:`LOOPBACK_HOSTS` and its ``--allow-host`` names on a loopback address or when names are given);
            None: any.
    """
    from ..pipelines.tal import DEFAULT_MIN_SCORE, DEFAULT_TOPK, RateError, check_fps  # the Python and CLI defaults
    given = {"image": image_model, "detect": detect_model, "segment": segment_model, "video": video_model,
             "translator": translator, "retrieval": retrieval, "localizer": localizer}
    pipelines = {slot: _pipeline(slot, model) for slot, model in given.items() if model is not None}
    slots = {slot: _Slot(slot, pipeline, max_waiting, info=_describe(pipeline))
             for slot, pipeline in pipelines.items()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for slot in slots.values():  # anyio limiters belong to the event loop that serves the app
            slot.limiter = anyio.CapacityLimiter(1)
        yield

    # fastapi-offline serves the Swagger / ReDoc assets from its package: /docs works without internet.
    app = FastAPIOffline(title="intern2", version=_version(), lifespan=lifespan,
                         description="InternImage, InternVideo and multilingual translation models over HTTP.")
    app.add_middleware(_BodyLimit, max_bytes=int(max_upload_mb * 2 ** 20))
    origins = check_origins(tuple(allow_origins))
    hosts = None if allowed_hosts is None else tuple(_hostname(host) for host in allowed_hosts)
    app.add_middleware(_SameOrigin, allowed=origins, hosts=hosts)
    if origins:  # outermost: preflights are answered, and every answer to an allowed site carries its headers
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=["content-type"], max_age=600)
    app.state.shutdown = threading.Event()

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        detail = str(exc.detail)
        if exc.status_code == 400 and detail.startswith(("Part exceeded maximum size", "Field exceeded maximum size")):
            detail = (f"a form field other than the file is over the form parser's limit of 1 MB ({detail}); on "
                      f"/v1/video/retrieve, texts must stay under 1 MB (and at most {MAX_CAPTIONS} captions)")
        elif exc.status_code == 400:  # FastAPI's own message does not say what a body should be
            detail += (" (expected UTF-8 JSON for /v1/translate, multipart form data for uploads, whose part headers,"
                       " the file name too, must stay short)")
        response = _error(exc.status_code, codes.get(exc.status_code, f"http_{exc.status_code}"), detail)
        response.headers.update(exc.headers or {})  # e.g. the Allow header of a 405
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        for e in exc.errors():
            loc = tuple(e.get("loc", ()))
            where = ".".join(str(p) for p in loc)
            if "Expected UploadFile" in str(e.get("msg")):  # a part without a filename is a text field
                problems.append(f"{where}: expected a file upload (a form part with a filename)")
                continue
            if loc == ("body",) and e.get("type") == "model_attributes_type":  # FastAPI parses JSON bodies only
                if media_type != "application/json" and not media_type.endswith("+json"):
                    return _error(415, "unsupported_media_type", f"{request.url.path}: expected a JSON body sent "
                                  f"with Content-Type: application/json, got {media_type or 'no Content-Type'}")
                problems.append("body: expected a JSON object")
                continue
            cause = (e.get("ctx") or {}).get("error")  # JSON syntax errors keep the reason here
            if e.get("type") == "json_invalid":  # its loc ends with a character offset, not a field
                problems.append(f"body: not valid JSON at character {loc[-1]}" +
                                (f" ({cause})" if isinstance(cause, str) else ""))
                continue
            problems.append(f"{where}: {e.get('msg', 'invalid')}" + (f" ({cause})" if isinstance(cause, str) else ""))
        return _error(422, "invalid_request", "; ".join(problems))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette still re-raises it afterwards, so the server logs the traceback.
        return _error(500, "internal_error", f"{exc.__class__.__name__}: {exc}")

    def slot_of(name: str) -> _Slot:
        if name not in slots:
            raise ServeError(503, "model_not_loaded", f"no {name} model is loaded; start the server with "
                             f"`intern2 serve {FLAGS[name]} ...`")
        return slots[name]

    async def read_upload(upload: UploadFile) -> Tuple[bytes, str]:
        return await upload.read(), upload.filename or "upload"

    @app.head("/healthz", include_in_schema=False)  # what health probes send
    @app.get("/healthz", summary="liveness: ok while the server answers")
    async def healthz() -> Dict[str, Any]:
        return {"status": "ok", "models": sorted(slots)}

    @app.head("/v1/models", include_in_schema=False)  # what health probes send
    @app.get("/v1/models", summary="the loaded models, their labels and languages")
    async def list_models() -> Dict[str, Any]:
        return {"models": {name: ({"loaded": True, **slots[name].info} if name in slots else
                                  {"loaded": False, "flag": FLAGS[name]}) for name in SLOTS},
                "limits": {"max_upload_mb": max_upload_mb, "max_image_pixels": max_image_pixels,
                           "max_frame_pixels": max_frame_pixels, "max_text_chars": max_text_chars,
                           "max_translate_steps": max_translate_steps, "max_request_seconds": max_request_seconds}}

    @app.post("/v1/classify", dependencies=[Depends(_checked_form)], responses=ERRORS,
              summary="image classification: top-k labels")
    async def classify(file: UploadFile = File(..., description="an image file"),
                       topk: int = Form(5, ge=1, le=100)) -> Dict[str, Any]:
        slot = slot_of("image")
        data, filename = await read_upload(file)
        return await slot.run(lambda: _timed(_classify, slot.model, _decode_image(data, filename, max_image_pixels),
                                             topk))

    @app.post("/v1/detect", dependencies=[Depends(_checked_form)], responses=ERRORS,
              summary="object detection + instance masks (COCO RLE), optionally drawn")
    async def detect(file: UploadFile = File(..., description="an image file"),
                     threshold: float = Form(0.5, ge=0.0, le=1.0), masks: bool = Form(False),
                     draw: bool = Form(True)) -> Dict[str, Any]:
        slot = slot_of("detect")
        data, filename = await read_upload(file)
        return await slot.run(lambda: _timed(_detect, slot.model, _decode_image(data, filename, max_image_pixels),
                                             threshold, masks, draw))

    @app.post("/v1/segment", dependencies=[Depends(_checked_form)], responses=ERRORS,
              summary="semantic segmentation: class histogram and overlay")
    async def segment(file: UploadFile = File(..., description="an image file"),
                      include_mask: bool = Form(False)) -> Dict[str, Any]:
        slot = slot_of("segment")
        data, filename = await read_upload(file)
        return await slot.run(lambda: _timed(_segment, slot.model, _decode_image(data, filename, max_image_pixels),
                                             include_mask))

    @app.post("/v1/video/classify", dependencies=[Depends(_checked_form)], responses=ERRORS,
              summary="action recognition on a video file: top-k labels")
    async def video_classify(file: UploadFile = File(..., description="a video file (mp4, webm, avi, ...)"),
                             topk: int = Form(5, ge=1, le=100)) -> Dict[str, Any]:
        slot = slot_of("video")
        return await slot.run(lambda: _timed(_video_upload, file,
                                             lambda path: _classify_video(slot.model, path, topk), max_frame_pixels))

    @app.post("/v1/video/retrieve", dependencies=[Depends(_checked_form)], responses=ERRORS,
              summary="video-to-text retrieval: rank candidate captions for a video")
    async def video_retrieve(file: UploadFile = File(..., description="a video file (mp4, webm, avi, ...)"),
                             texts: str = Form(..., description="candidate captions, one per line"),
                             topk: int = Form(10, ge=1, le=MAX_CAPTIONS)) -> Dict[str, Any]:
        slot = slot_of("retrieval")
        captions = [line.strip() for line in texts.splitlines() if line.strip()]
        if not captions:
            raise ServeError(400, "empty_text", "texts: no captions to rank (one caption per line)")
        if len(captions) > MAX_CAPTIONS:
            raise ServeError(413, "too_many_texts", f"texts: {len(captions)} captions is more than the limit of "
                             f"{MAX_CAPTIONS}")
        return await slot.run(lambda: _timed(_video_upload, file,
                                             lambda path: _retrieve(slot.model, path, captions, topk),
                                             max_frame_pixels))

    @app.post("/v1/video/localize", dependencies=[Depends(_checked_form)], responses=ERRORS,
              summary="temporal action localization: segments (seconds) of an untrimmed video")
    async def video_localize(file: UploadFile = File(..., description="snippet features (.npy, (T, C) float), or a "
                                                     "video file when the server has the localizer's encoder"),
                             fps: Optional[float] = Form(None, gt=0, description="frames per second of the "
                                                         "video (default: the container's, for a video)"),
                             duration: Optional[float] = Form(None, gt=0, description="the video's length in "
                                                              "seconds (features only; default: the end of the "
                                                              "last snippet)"),
                             min_score: float = Form(DEFAULT_MIN_SCORE, ge=0.0, le=1.0),
                             topk: int = Form(DEFAULT_TOPK, ge=1, le=1000)) -> Dict[str, Any]:
        slot = slot_of("localizer")
        filename = file.filename or "upload"
        if fps is not None:  # before the upload is read or decoded
            try:
                check_fps(fps, filename)
            except RateError as exc:
                raise ServeError(422, "invalid_field", f"{exc.field}: {exc.detail}") from None
        if filename.lower().endswith(".npy"):
            if fps is None and not slot.model.protocol.default_fps:
                raise ServeError(422, "invalid_field", f"fps: needed with snippet features ({filename}): the frames "
                                 f"per second of their video (an upload has no sidecar JSON to read it from)")
            data, _ = await read_upload(file)
            return await slot.run(lambda: _timed(_localize, slot.model, data, filename, fps, duration, min_score,
                                                 topk))
        if slot.model.encoder is None:
            raise ServeError(400, "features_expected", f"{filename}: this server localizes in snippet features "
                             f"(.npy); start it with --tal-encoder to upload videos")
        if duration is not None:
            raise ServeError(400, "invalid_field", "duration: only for snippet features (.npy); a video's length is "
                             "its container's")
        return await slot.run(lambda: _timed(_video_upload, file, lambda path: slot.model.video(
            path, fps=fps, min_score=min_score, topk=topk), max_frame_pixels))

    @app.post("/v1/translate", dependencies=[Depends(_query_free)], responses=ERRORS,
              summary="translate text between any two languages the translator has")
    async def translate(request: TranslateRequest, http_request: Request) -> Dict[str, Any]:
        slot = slot_of("translator")
        text = request.text
        try:
            check_text(text, "text")
        except ValueError as exc:
            raise ServeError(400, "invalid_text", str(exc)) from None
        if not text.strip():
            raise ServeError(400, "empty_text", "text: nothing to translate (empty or only whitespace)")
        if len(text) > max_text_chars:
            raise ServeError(413, "text_too_long", f"text: {len(text)} characters is more than the server's limit "
                             f"of {max_text_chars}; send it in parts")
        languages = {name: _resolve_language(slot.model.tokenizer, name, getattr(request, name))
                     for name in ("src_lang", "tgt_lang")}
        try:
            steps = slot.model.decoding_steps([text], languages["src_lang"], request.num_beams,
                                              request.max_new_tokens)
        except ValueError as exc:  # a sentence longer than the model takes
            raise ServeError(413, "sentence_too_long", f"text: {exc}") from None
        if steps > max_translate_steps:
            raise ServeError(413, "too_much_work", f"this request needs up to {steps:,} decoding steps x beams, more "
                             f"than the server's limit of {max_translate_steps:,}: send less text, fewer beams or "
                             f"a lower max_new_tokens")
        cancelled = threading.Event()
        stop = _stopper(cancelled, app.state.shutdown, max_request_seconds)
        translation = await _while_connected(http_request, cancelled, lambda: slot.run(
            lambda: _timed(_translate, slot.model, text, languages["src_lang"], languages["tgt_lang"],
                           request.num_beams, request.max_new_tokens, stop)))
        return {**translation, **languages}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.head("/", include_in_schema=False)
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


def _resolve_language(tokenizer: Any, field_name: str, code: str) -> str:
    """Registry key of ``code``; unknown codes and languages the tokenizer lacks are 422s that say what exists."""
    from ..text.languages import UnknownLanguageError, get_language
    from ..text.tokenizer import MissingLanguageTokenError
    try:
        key = get_language(code).key
        tokenizer.lang_token_id(key)
    except UnknownLanguageError as exc:
        raise ServeError(422, "unknown_language", f"{field_name}: {exc}", suggestions=exc.suggestions) from exc
    except MissingLanguageTokenError as exc:
        raise ServeError(422, "unsupported_language", f"{field_name}: this translator has no token for {key} "
                         f"({len(tokenizer.languages)} languages; GET /v1/models lists them)") from exc
    return key


def _timed(function: Callable[..., Any], *args: Any) -> Dict[str, Any]:
    """Run a model's work and time it; a ValueError of the pipeline (input it cannot process, e.g. an image
    too elongated for its resize) is the request's fault: a 422, not a 500."""
    start = time.perf_counter()
    try:
        result = function(*args)
    except ServeError:
        raise
    except ValueError as exc:
        raise ServeError(422, "unprocessable", str(exc)) from None
    return {**result, "seconds": round(time.perf_counter() - start, 4)}


def _version() -> str:
    from .. import __version__
    return __version__
