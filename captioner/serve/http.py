"""The HTTP API: ``POST /v1/caption``, ``GET /v1/health``, ``GET /v1/model`` and ``GET /v1/metrics``, as plain JSON.

Programs that caption photos (a CMS adding alt text, a mobile backend) call an endpoint, not a UI. The same
``/v1`` application is served alone by ``captioner serve`` (:func:`serve`) and beside the demo's UI in the
demo's own process (:func:`mounted_beside`). Every request goes through one :class:`Batcher`, so concurrent
requests share batched encodes and searches; FastAPI's pages document it at ``/v1/docs`` and ``/v1/openapi.json``.

What comes in is bounded where it enters (:class:`ServerLimits`). A body is read in chunks under a deadline that
grows with what has arrived (408 once it stalls), refused with 413 past ``max_body_bytes`` whatever its
``Content-Length`` says, and with 503 once all uploads together would hold more than ``upload_memory_mb``;
slow bodies therefore hold no place meant for the model. Decoding options are read by the fields of
:class:`GenerationConfig` and checked by it (400 naming the option). Only then does a request take one of the
``max_queue + max_batch`` places (503 when none is free), and the photo is decoded by the :class:`DecodePool`
under its time and memory budget (400 naming the upload) before it joins a batch. Errors are
``{"detail": "<one line>"}``, each logged once per cause per interval (:mod:`.logs`), and counted in
``/v1/metrics``. :func:`serve` adds the per-connection bounds (:mod:`.connections`) and the access rules
(:mod:`.access`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException  # what Starlette's own parsers raise
from starlette.requests import ClientDisconnect

from ..bounds import json_schema, options_from_text
from ..data.images import describe
from ..errors import BusyError, CaptionerError
from ..generation.config import GenerationConfig
from ..models.captioner import Captioner
from ..models.pipeline import CaptionPipeline
from ..runtime import ENGINE_NAMES
from ..runtime import BUNDLED_MODEL_CARD
from . import logs
from .access import Access, AccessGuard, is_loopback
from .batcher import BatchConfig, Batcher, missed_deadline
from .connections import server_config
from .decode_pool import PHOTO_FORMATS, DecodePool
from .limits import MAX_BODY_BYTES, MIN_BODY_RATE, ServerLimits
from .metrics import Metrics

log = logging.getLogger(__name__)

PREFIX = "/v1"
DEFAULT_PORT = 8000
IMAGE_FIELD = "image"  # the multipart file field
RETRY_AFTER = "1"  # seconds, in every 503
ROUTES = ("/caption", "/health", "/model", "/metrics", "/docs", "/openapi.json")  # metrics' labels; others: "other"


class CaptionOut(BaseModel):
    text: str
    log_prob: float  # the model's log-likelihood of the words and <end>
    score: float  # what beams are ranked by: log_prob / length ** length_penalty


class LabelOut(BaseModel):
    label: str  # an ImageNet class: what the CNN sees, not the caption model
    probability: float


class TimingOut(BaseModel):
    total_ms: float  # in this server, from the request's arrival to its answer
    decode_ms: float  # decoding and preprocessing its photo, in a decode worker
    queued_ms: float  # waiting for its batch
    encoder_ms: float  # its batch's CNN
    decoder_ms: float  # the search of its batch's requests with its decoding options
    batch_size: int  # requests in its batch


class CaptionAnswer(BaseModel):
    model: str
    captions: list[CaptionOut]  # most likely first
    labels: list[LabelOut]
    timing: TimingOut


class Health(BaseModel):
    status: str
    model: str
    waiting: int  # requests queued for the model now
    max_queue: int


class Problem(BaseModel):
    detail: str  # one line naming what was wrong


class Refusal(HTTPException):
    """A refused request: its status, ``{"detail": message}``, and the ``reason`` it is logged and counted by."""

    def __init__(self, status: int, message: str, reason: str, close: bool = False):
        headers = {"Retry-After": RETRY_AFTER} if status == 503 else {}
        if close:  # its body was not read to the end: the connection cannot carry another request
            headers["Connection"] = "close"
        super().__init__(status, message, headers=headers or None)
        self.reason = reason


@dataclass
class Service:
    """What the ``/v1`` routes share: the model's batcher, the decode pool, the limits and the counters."""

    batcher: Batcher
    limits: ServerLimits
    pool: DecodePool
    metrics: Metrics
    max_body_bytes: int = MAX_BODY_BYTES
    uploads_held: int = 0  # bytes of request bodies in the server now; all on the event loop's thread

    @classmethod
    def over(cls, batcher: Batcher, limits: ServerLimits | None = None,
             max_body_bytes: int = MAX_BODY_BYTES) -> "Service":
        limits = limits or ServerLimits()
        pool = DecodePool(batcher.model.encoder.preprocess, limits)
        metrics = Metrics(lambda: batcher.waiting, lambda: pool.busy)
        batcher.on_batch = metrics.batch_size.observe
        return cls(batcher, limits, pool, metrics, max_body_bytes)


def api_app(service: Service, model_dir: str | None = None) -> FastAPI:
    """The ``/v1`` application over ``service``, to be mounted at :data:`PREFIX`; ``model_dir`` as given to
    ``from_pretrained`` (``None``: the bundled model), for ``/v1/model``."""
    batcher, limits, metrics = service.batcher, service.limits, service.metrics
    model = batcher.model
    name = "bundled" if model_dir is None else Path(model_dir).name
    facts = model_facts(model, name, BUNDLED_MODEL_CARD if model_dir is None else None)
    admitted = batcher.config.max_queue + batcher.config.max_batch
    in_flight = 0  # caption requests whose bodies have arrived and that are not yet answered
    app = FastAPI(title="captioner", version="1", summary="Image captions over HTTP: POST a photo, get JSON.",
                  responses={400: {"model": Problem}, 408: {"model": Problem}, 413: {"model": Problem},
                             503: {"model": Problem}})

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = exc.reason if isinstance(exc, Refusal) else f"http {exc.status_code}"
        log.warning("refused a request (%d): %s", exc.status_code, exc.detail, extra={"cause": reason})
        metrics.refused(reason)
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.middleware("http")
    async def counted(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        metrics.answered(path if path in ROUTES else "other", response.status_code, time.perf_counter() - started)
        return response

    @app.post("/caption", response_model=CaptionAnswer, openapi_extra=caption_request_docs(model.generation_config))
    async def caption(request: Request) -> dict:
        """Caption the photo sent as the request body or as the multipart file field ``image``; decoding options
        as query parameters or form fields (the names, bounds and defaults of the Python API and the CLI)."""
        nonlocal in_flight
        started = time.perf_counter()
        if in_flight >= admitted:
            raise busy(in_flight)
        body = BodyReader(request, service)
        try:
            image, upload, pairs = await read_upload(body)
            try:
                config = model.generation_config.updated(**options_from_text(GenerationConfig, pairs,
                                                                             "decoding option"))
            except CaptionerError as exc:
                raise Refusal(400, str(exc), "option") from None
            if in_flight >= admitted:
                raise busy(in_flight)
            in_flight += 1
            try:
                result, decoded = await caption_upload(service, image, config)
            except asyncio.TimeoutError:
                raise Refusal(503, str(missed_deadline(batcher.config.deadline_s)), "deadline") from None
            except CaptionerError as exc:
                message = str(exc).replace(describe(image), f"{upload} ({len(image)} bytes)")
                raise (Refusal(503, message, "busy") if isinstance(exc, BusyError) else
                       Refusal(400, message, "image")) from None
            finally:
                in_flight -= 1
        finally:
            body.release()
        timing = result.timing
        return {"model": name, **CaptionPipeline.postprocess(result.prediction),
                "timing": {"total_ms": _ms(time.perf_counter() - started), "decode_ms": _ms(decoded),
                           "queued_ms": _ms(timing.queued), "encoder_ms": _ms(timing.encoder),
                           "decoder_ms": _ms(timing.decoder), "batch_size": timing.batch}}

    @app.get("/health", response_model=Health, responses={503: {"model": Problem}})
    async def health() -> dict:
        """Whether the server is taking requests, and how many are waiting for the model."""
        if not batcher.running:
            raise Refusal(503, "the captioning worker is not running", "stopped")
        return {"status": "ok", "model": name, "waiting": batcher.waiting, "max_queue": batcher.config.max_queue}

    @app.get("/model")
    async def model_card() -> dict[str, Any]:
        """What is served: the model's architecture, vocabulary, default decoding, engine and, for the bundled
        model, its model card; and this server's limits."""
        return {**facts, "limits": {"max_body_bytes": service.max_body_bytes, **asdict(batcher.config),
                                    **asdict(limits), "photo_formats": list(PHOTO_FORMATS)}}

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Counters in Prometheus's text format: requests by route and status, latency, batch sizes, queue
        depth, decode workers busy, refusals by reason."""
        return metrics_answer(metrics)

    return app


async def caption_upload(service: Service, image: bytes, config: GenerationConfig) -> tuple[Any, float]:
    """``image`` decoded by the pool, then captioned in its batch, within the batcher's deadline; the
    :class:`~.batcher.Result` and the seconds its decoding took."""
    deadline = service.batcher.config.deadline_s
    started = time.perf_counter()
    pixels = await asyncio.wait_for(service.pool.decode(image), deadline)
    decoded = time.perf_counter() - started
    future = service.batcher.submit(pixels, config)
    result = await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - decoded))
    return result, decoded


def metrics_answer(metrics: Metrics) -> Response:
    return Response(metrics.exposition(), media_type=metrics.content_type)


def busy(in_flight: int) -> Refusal:
    return Refusal(503, f"the server is busy ({in_flight} requests in progress); retry in a moment", "busy")


def model_facts(model: Captioner, name: str, card: Path | None) -> dict[str, Any]:
    """The facts of the model card that a program can use: architecture, vocabulary, defaults, engine."""
    config = model.config.to_dict()
    return {"name": name, "encoder": config["encoder"], "decoder": config["decoder"],
            "vocabulary_size": len(model.vocab), "generation": config["generation"],
            "engine": ENGINE_NAMES[model.engine], "device": str(model.device),
            "model_card": card.read_text(encoding="utf-8") if card is not None and card.is_file() else None}


class BodyReader:
    """``request`` whose body is read under the service's bounds, as it arrives.

    413 once more than ``max_body_bytes`` have arrived (a declared ``Content-Length`` above it at once), 408 once
    the body stalls (it gets ``body_timeout_s``, plus a second for every :data:`MIN_BODY_RATE` bytes received),
    503 once all uploads together would hold more than ``upload_memory_mb``. What it took of that memory is given
    back by :meth:`release`.
    """

    def __init__(self, request: Request, service: Service):
        self.service, self.held = service, 0
        limit = service.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 15 or int(declared) > limit):
            raise too_large(limit)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + service.limits.body_timeout_s

        async def receive():
            nonlocal deadline
            try:
                message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise Refusal(408, f"the request body stopped arriving ({self.held:,} bytes in "
                                   f"{loop.time() - started:.1f} s)", "body-timeout", close=True) from None
            size = len(message.get("body", b""))
            self._take(size)
            deadline += size / MIN_BODY_RATE
            return message

        self.request = Request(request.scope, receive)

    def _take(self, size: int) -> None:
        service, limit = self.service, self.service.max_body_bytes
        if self.held + size > limit:
            raise too_large(limit)
        budget = self.service.limits.upload_memory_mb << 20
        if service.uploads_held + size > budget:
            raise Refusal(503, f"uploads in progress hold {service.uploads_held:,} bytes, the server's limit; "
                               "retry in a moment", "upload-memory", close=True)
        self.held += size
        service.uploads_held += size

    def release(self) -> None:
        self.service.uploads_held -= self.held
        self.held = 0


async def read_upload(body: BodyReader) -> tuple[bytes, str, list[tuple[str, str]]]:
    """The image's bytes, what to call it in errors, and the decoding options given (query, then form fields)."""
    request = body.request
    pairs = list(request.query_params.multi_items())
    try:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            image, upload = await request.body(), "request body"
        else:
            try:
                form = await request.form(max_files=1, max_fields=len(fields(GenerationConfig)))
            except StarletteHTTPException as exc:
                if isinstance(exc, Refusal):
                    raise
                raise Refusal(400, f"multipart upload: {exc.detail}", "upload") from None
            image, upload = await _form_upload(form, pairs)
    except ClientDisconnect:
        raise Refusal(400, "the client disconnected before its upload was complete", "disconnected") from None
    if not image:
        raise Refusal(400, f"{upload}: empty, no image (send the photo as the request body or as the multipart "
                           f"file field '{IMAGE_FIELD}')", "upload")
    return image, upload, pairs


async def _form_upload(form: FormData, pairs: list[tuple[str, str]]) -> tuple[bytes, str]:
    """The file field ``image`` of a multipart form, its other fields appended to ``pairs``; the form closed."""
    image, upload = b"", ""
    try:
        for key, value in form.multi_items():
            if not isinstance(value, UploadFile):
                pairs.append((key, value))
            elif key != IMAGE_FIELD:
                raise Refusal(400, f"multipart upload: the photo goes in the file field '{IMAGE_FIELD}', not "
                                   f"{key[:40]!r}", "upload")
            else:
                image, upload = await value.read(), f"upload {(value.filename or '')[:80]!r}"
    finally:
        await form.close()
    if not upload:
        raise Refusal(400, f"multipart upload without a file field '{IMAGE_FIELD}'", "upload")
    return image, upload


def too_large(limit: int) -> Refusal:
    return Refusal(413, f"request body larger than {limit:,} bytes", "too-large", close=True)


def caption_request_docs(defaults: GenerationConfig) -> dict:
    """OpenAPI 3.1 for what ``/caption`` reads itself: the body (an image, or a multipart form) and the options,
    the latter from :class:`GenerationConfig`'s declaration (:func:`json_schema`) with the model's defaults."""
    options = json_schema(GenerationConfig, defaults.to_dict())
    form = {IMAGE_FIELD: {"type": "string", "format": "binary"}, **options}
    return {"parameters": [{"name": name, "in": "query", "required": False, "schema": schema}
                           for name, schema in options.items()],
            "requestBody": {"required": True, "content": {
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": form,
                                                   "required": [IMAGE_FIELD]}}}}}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


@asynccontextmanager
async def running(service: Service) -> AsyncIterator[None]:
    """The batcher's worker and the decode workers for as long as the server runs."""
    service.pool.start()
    service.batcher.start()
    try:
        yield
    finally:
        await asyncio.to_thread(service.batcher.close)
        service.pool.close()


def mounted_beside(batcher: Batcher, model_dir: str | None = None,
                   max_body_bytes: int = MAX_BODY_BYTES) -> Callable[[FastAPI], AbstractAsyncContextManager]:
    """A lifespan for the demo's FastAPI app (``launch(app_kwargs={"lifespan": ...})``) that mounts ``/v1`` on it
    and runs ``batcher``: Gradio builds its app inside ``launch()``, and its lifespan is the moment after the app
    exists and before its first request."""
    service = Service.over(batcher, max_body_bytes=max_body_bytes)
    api = api_app(service, model_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.mount(PREFIX, api)
        async with running(service):
            yield

    return lifespan


def standalone_app(service: Service, model_dir: str | None = None) -> FastAPI:
    """``/v1`` alone, as ``captioner serve`` runs it; ``/`` leads to its documentation, ``/metrics`` is
    ``/v1/metrics`` where Prometheus looks by default."""
    app = FastAPI(lifespan=lambda _: running(service), docs_url=None, redoc_url=None, openapi_url=None)
    app.mount(PREFIX, api_app(service, model_dir))

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/docs")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return metrics_answer(service.metrics)

    return app


def serve(model_dir: str | None = None, host: str | None = None, port: int | None = None, device: str = "auto",
          engine: str = "auto", batching: BatchConfig | None = None, limits: ServerLimits | None = None,
          access: Access | None = None) -> None:
    """Load the model once, then serve ``/v1`` alone on 127.0.0.1:8000 unless told otherwise, until SIGTERM or
    Ctrl-C (requests in progress get ``shutdown_timeout_s``)."""
    host, access, limits = host or "127.0.0.1", access or Access(), limits or ServerLimits()
    access.check(host)
    model = Captioner.from_pretrained(model_dir, device=device, engine=engine)
    service = Service.over(Batcher(model, batching), limits)
    app = AccessGuard(standalone_app(service, model_dir), access.api_key, is_loopback(host), service.metrics.refused)
    logs.install()
    uvicorn.Server(server_config(app, limits, host, port or DEFAULT_PORT, service.metrics.refused)).run()
