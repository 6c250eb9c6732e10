"""The HTTP API: ``POST /v1/caption``, ``GET /v1/health`` and ``GET /v1/model``, as plain JSON.

Programs that caption photos (a CMS adding alt text, a mobile backend) call an endpoint, not a UI. The same
``/v1`` application is served alone by ``captioner serve`` (:func:`serve`) and beside the demo's UI in the
demo's own process (:func:`mounted_beside`). Every request goes through one :class:`Batcher`, so concurrent
requests share batched encodes and searches; FastAPI's pages document it at ``/v1/docs`` and ``/v1/openapi.json``.

What comes in is bounded where it enters: at most ``max_queue + max_batch`` caption requests are in the server
at once (more get 503 before their body is read), a body is read in chunks and refused with 413 past
``max_body_bytes`` whatever its ``Content-Length`` says, decoding options are read by the fields of
:class:`GenerationConfig` and checked by it (400 naming the option, with the API's and the CLI's messages), and
the image by the API's own loader (400 naming the upload). Errors are ``{"detail": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect

from ..bounds import field_types, options_from_text
from ..data.images import describe
from ..errors import BusyError, CaptionerError
from ..generation.config import GenerationConfig
from ..models.captioner import Captioner
from ..models.onnx_engine import ENGINE_NAMES
from ..runtime import BUNDLED_MODEL_CARD
from .batcher import BatchConfig, Batcher, missed_deadline
from .jsonl import caption_fields

log = logging.getLogger(__name__)

PREFIX = "/v1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 20_000_000  # the demo's upload limit too
IMAGE_FIELD = "image"  # the multipart file field
RETRY_AFTER = "1"  # seconds, in every 503


class CaptionOut(BaseModel):
    text: str
    log_prob: float  # the model's log-likelihood of the words and <end>
    score: float  # what beams are ranked by: log_prob / length ** length_penalty


class LabelOut(BaseModel):
    label: str  # an ImageNet class: what the CNN sees, not the caption model
    probability: float


class TimingOut(BaseModel):
    total_ms: float  # in this server, from the request's arrival to its answer
    queued_ms: float  # waiting for its batch
    encoder_ms: float  # its batch's image loading and CNN
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


def api_app(batcher: Batcher, model_dir: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ``/v1`` application over a running ``batcher``, to be mounted at :data:`PREFIX`; ``model_dir`` as given
    to ``from_pretrained`` (``None``: the bundled model), for ``/v1/model``."""
    model = batcher.model
    name = "bundled" if model_dir is None else Path(model_dir).name
    facts = model_facts(model, name, BUNDLED_MODEL_CARD if model_dir is None else None)
    admitted = batcher.config.max_queue + batcher.config.max_batch
    in_flight = 0  # caption requests between arrival and answer; all on the event loop's thread
    app = FastAPI(title="captioner", version="1", summary="Image captions over HTTP: POST a photo, get JSON.",
                  responses={400: {"model": Problem}, 413: {"model": Problem}, 503: {"model": Problem}})

    @app.post("/caption", response_model=CaptionAnswer, openapi_extra=caption_request_docs())
    async def caption(request: Request) -> dict:
        """Caption the photo sent as the request body or as the multipart file field ``image``; decoding options
        as query parameters or form fields (the names, bounds and defaults of the Python API and the CLI)."""
        nonlocal in_flight
        started = time.perf_counter()
        if in_flight >= admitted:
            raise refusal(503, f"the server is busy ({in_flight} requests in progress); retry in a moment")
        in_flight += 1
        try:
            image, upload, pairs = await read_upload(request, max_body_bytes)
            try:
                config = model.generation_config.updated(**options_from_text(GenerationConfig, pairs,
                                                                             "decoding option"))
                result = await asyncio.wait_for(asyncio.wrap_future(batcher.submit(image, config)),
                                                batcher.config.deadline_s)
            except asyncio.TimeoutError:
                raise refusal(503, str(missed_deadline(batcher.config.deadline_s))) from None
            except CaptionerError as exc:
                message = str(exc).replace(describe(image), f"{upload} ({len(image)} bytes)")
                raise refusal(503 if isinstance(exc, BusyError) else 400, message) from None
        finally:
            in_flight -= 1
        timing = result.timing
        return {"model": name, **caption_fields(result.captions, result.labels),
                "timing": {"total_ms": _ms(time.perf_counter() - started), "queued_ms": _ms(timing.queued),
                           "encoder_ms": _ms(timing.encoder), "decoder_ms": _ms(timing.decoder),
                           "batch_size": timing.batch}}

    @app.get("/health", response_model=Health, responses={503: {"model": Problem}})
    async def health() -> dict:
        """Whether the server is taking requests, and how many are waiting for the model."""
        if not batcher.running:
            raise refusal(503, "the captioning worker is not running")
        return {"status": "ok", "model": name, "waiting": batcher.waiting, "max_queue": batcher.config.max_queue}

    @app.get("/model")
    async def model_card() -> dict[str, Any]:
        """What is served: the model's architecture, vocabulary, default decoding, engine and, for the bundled
        model, its model card; and this server's limits."""
        return {**facts, "limits": {"max_body_bytes": max_body_bytes, **asdict(batcher.config)}}

    return app


def model_facts(model: Captioner, name: str, card: Path | None) -> dict[str, Any]:
    """The facts of the model card that a program can use: architecture, vocabulary, defaults, engine."""
    config = model.config.to_dict()
    return {"name": name, "encoder": config["encoder"], "decoder": config["decoder"],
            "vocabulary_size": len(model.vocab), "generation": config["generation"],
            "engine": ENGINE_NAMES[model.engine], "device": str(model.device),
            "model_card": card.read_text(encoding="utf-8") if card is not None and card.is_file() else None}


async def read_upload(request: Request, limit: int) -> tuple[bytes, str, list[tuple[str, str]]]:
    """The image's bytes, what to call it in errors, and the decoding options given (query, then form fields)."""
    pairs = list(request.query_params.multi_items())
    body = limited(request, limit)
    try:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            image, upload = await body.body(), "request body"
        else:
            image, upload = await _form_upload(await body.form(max_files=1, max_fields=len(fields(GenerationConfig))),
                                               pairs)
    except ClientDisconnect:
        raise refusal(400, "the client disconnected before its upload was complete") from None
    if not image:
        raise refusal(400, f"{upload}: empty, no image (send the photo as the request body or as the multipart "
                           f"file field '{IMAGE_FIELD}')")
    return image, upload, pairs


async def _form_upload(form: FormData, pairs: list[tuple[str, str]]) -> tuple[bytes, str]:
    """The file field ``image`` of a multipart form, its other fields appended to ``pairs``; the form closed."""
    image, upload = b"", ""
    try:
        for key, value in form.multi_items():
            if not isinstance(value, UploadFile):
                pairs.append((key, value))
            elif key != IMAGE_FIELD:
                raise refusal(400, f"multipart upload: the photo goes in the file field '{IMAGE_FIELD}', not "
                                   f"{key[:40]!r}")
            else:
                image, upload = await value.read(), f"upload {(value.filename or '')[:80]!r}"
    finally:
        await form.close()
    if not upload:
        raise refusal(400, f"multipart upload without a file field '{IMAGE_FIELD}'")
    return image, upload


def limited(request: Request, limit: int) -> Request:
    """``request`` whose body is refused with 413 once more than ``limit`` bytes have arrived: a declared
    ``Content-Length`` above it at once, a chunked or lying one as its chunks come, so at most one chunk
    beyond ``limit`` is ever read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large(limit)
        return message

    return Request(request.scope, receive)


def too_large(limit: int) -> HTTPException:
    return refusal(413, f"request body larger than {limit:,} bytes")


def refusal(status: int, message: str) -> HTTPException:
    """A refused request: one line in the server's log, and its status with ``{"detail": message}``."""
    log.warning("refused a request (%d): %s", status, message)
    return HTTPException(status, message, headers={"Retry-After": RETRY_AFTER} if status == 503 else None)


def caption_request_docs() -> dict:
    """OpenAPI for what ``/caption`` reads itself: the body (an image, or a multipart form) and the options."""
    kinds = {int: "integer", float: "number", bool: "boolean", str: "string"}
    types = field_types(GenerationConfig)
    options = {}
    for item in fields(GenerationConfig):
        kind, optional = types[item.name]
        schema: dict[str, Any] = {"type": kinds[kind], "description": item.metadata["help"]}
        if "range" in item.metadata:
            schema["minimum"], schema["maximum"] = item.metadata["range"]
        if "choices" in item.metadata:
            schema["enum"] = list(item.metadata["choices"])
        options[item.name] = {**schema, "nullable": True} if optional else schema
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
async def running(batcher: Batcher) -> AsyncIterator[None]:
    """The batcher's worker for as long as the server runs."""
    batcher.start()
    try:
        yield
    finally:
        await asyncio.to_thread(batcher.close)


def mounted_beside(batcher: Batcher, model_dir: str | None = None,
                   max_body_bytes: int = MAX_BODY_BYTES) -> Callable[[FastAPI], AbstractAsyncContextManager]:
    """A lifespan for the demo's FastAPI app (``launch(app_kwargs={"lifespan": ...})``) that mounts ``/v1`` on it
    and runs ``batcher``: Gradio builds its app inside ``launch()``, and its lifespan is the moment after the app
    exists and before its first request."""
    api = api_app(batcher, model_dir, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.mount(PREFIX, api)
        async with running(batcher):
            yield

    return lifespan


def standalone_app(batcher: Batcher, model_dir: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """``/v1`` alone, as ``captioner serve`` runs it; ``/`` leads to its documentation."""
    app = FastAPI(lifespan=lambda _: running(batcher), docs_url=None, redoc_url=None, openapi_url=None)
    app.mount(PREFIX, api_app(batcher, model_dir, max_body_bytes))

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/docs")

    return app


def serve(model_dir: str | None = None, host: str | None = None, port: int | None = None, device: str = "auto",
          engine: str = "auto", batching: BatchConfig | None = None) -> None:
    """Load the model once, then serve ``/v1`` alone on 127.0.0.1:8000 unless told otherwise, until interrupted."""
    model = Captioner.from_pretrained(model_dir, device=device, engine=engine)
    app = standalone_app(Batcher(model, batching), model_dir)
    uvicorn.run(app, host=host or "127.0.0.1", port=port or DEFAULT_PORT, access_log=False, log_level="info")

