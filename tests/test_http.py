"""The HTTP API and its micro-batcher: answers equal ``Captioner.generate``'s, each bad request fails alone and
with its own status, and the server keeps serving. In-process (FastAPI's TestClient, or uvicorn on 127.0.0.1 in a
thread) on the tiny random-weight model."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from captioner.bounds import field_types, options_from_text
from captioner.cli import main
from captioner.errors import BusyError, ConfigError, ImageError
from captioner.generation.config import GenerationConfig
from captioner.serve import batcher as batcher_module
from captioner.serve.batcher import BatchConfig, Batcher
from captioner.serve.connections import server_config
from captioner.serve.http import Service, standalone_app
from captioner.serve.limits import MAX_BODY_BYTES, ServerLimits
from conftest import ROOT
from synthetic import png_header

PHOTOS = sorted((ROOT / "assets" / "examples").glob("*.jpg"))
WIDE = {"beam_size": "4", "num_return_sequences": "3"}


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [path.read_bytes() for path in PHOTOS]


@pytest.fixture(scope="module")
def corrupt(photos) -> dict[str, tuple[bytes, str]]:
    """Bad uploads and the start of the one line each must get."""
    return {"text": (b"not a photo at all", "not an image (unrecognised file format)"),
            "truncated": (photos[0][:2000], "truncated or corrupt image data"),
            "bomb": (png_header(30000, 30000), "image dimensions are above the limit of 50,000,000 pixels")}


@pytest.fixture(scope="module")
def client(tiny_model, tiny_model_dir) -> Iterator[TestClient]:
    batcher = Batcher(tiny_model, BatchConfig(batch_window_ms=0))
    with TestClient(standalone_app(Service.over(batcher, max_body_bytes=1_000_000), str(tiny_model_dir))) as test_client:
        yield test_client


def expected(model, image: bytes, **options) -> list[dict]:
    """What ``Captioner.generate`` says of one image alone, as the API's JSON has it."""
    return [{"text": c.text, "log_prob": c.log_prob, "score": c.score}
            for c in model.generate([image], **options)[0]]


def assert_same_captions(answer: list[dict], wanted: list[dict]) -> None:
    assert [c["text"] for c in answer] == [c["text"] for c in wanted]
    assert [c["log_prob"] for c in answer] == pytest.approx([c["log_prob"] for c in wanted], abs=2e-4)
    assert [c["score"] for c in answer] == pytest.approx([c["score"] for c in wanted], abs=2e-4)


# ---------------------------------------------------------------------------------------- answers
def test_a_photo_as_the_body_gets_captioners_caption_and_labels(client, tiny_model, tiny_model_dir, photos):
    answer = client.post("/v1/caption", content=photos[0], headers={"content-type": "image/jpeg"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["captions"][0]["text"] == tiny_model.caption(photos[0])
    assert_same_captions(body["captions"], expected(tiny_model, photos[0]))
    assert [(label["label"], label["probability"]) for label in body["labels"]] == tiny_model.classify(photos[0])
    assert body["model"] == tiny_model_dir.name
    assert set(body["timing"]) == {"total_ms", "decode_ms", "queued_ms", "encoder_ms", "decoder_ms", "batch_size"}


def test_options_as_query_parameters_or_form_fields(client, tiny_model, photos):
    wanted = expected(tiny_model, photos[1], beam_size=4, num_return_sequences=3)
    by_query = client.post("/v1/caption", params=WIDE, content=photos[1])
    by_form = client.post("/v1/caption", data=WIDE, files={"image": ("dog.jpg", photos[1], "image/jpeg")})
    for answer in (by_query, by_form):
        assert answer.status_code == 200
        assert_same_captions(answer.json()["captions"], wanted)
    greedy = client.post("/v1/caption", params={"strategy": "greedy", "max_length": "5", "suppress_unk": "false"},
                         content=photos[1])
    assert_same_captions(greedy.json()["captions"],
                         expected(tiny_model, photos[1], strategy="greedy", max_length=5, suppress_unk=False))


@pytest.mark.parametrize("options, message", [
    ({"beam_size": "100"}, "beam_size must be between 1 and 64, not 100"),
    ({"beam_size": "3.5"}, "beam_size must be an integer, not '3.5'"),
    ({"temperature": "nan"}, "temperature must be a finite number"),
    ({"top_p": "2"}, "top_p must be between 1e-09 and 1.0, not 2.0"),
    ({"strategy": "best"}, "strategy must be one of beam, greedy, sample, not 'best'"),
    ({"suppress_unk": "maybe"}, "suppress_unk must be true or false, not 'maybe'"),
    ({"beam_sizes": "3"}, "unknown decoding option(s) beam_sizes"),
    ({"strategy": "greedy", "num_return_sequences": "2"}, "greedy decoding returns one caption"),
    ({"min_length": "9", "max_length": "5"}, "min_length cannot exceed max_length"),
])
def test_options_out_of_range_get_400_naming_the_option(client, photos, options, message):
    by_query = client.post("/v1/caption", params=options, content=photos[0])
    by_form = client.post("/v1/caption", data=options, files={"image": ("a.jpg", photos[0], "image/jpeg")})
    for answer in (by_query, by_form):
        assert answer.status_code == 400
        assert message in answer.json()["detail"] and "\n" not in answer.json()["detail"]


def test_an_option_given_twice_is_refused(client, photos):
    answer = client.post("/v1/caption?beam_size=2", data={"beam_size": "3"},
                         files={"image": ("a.jpg", photos[0], "image/jpeg")})
    assert answer.status_code == 400 and answer.json()["detail"] == "decoding option beam_size is given twice"


def test_bad_uploads_get_400_naming_the_upload(client, corrupt):
    for data, reason in corrupt.values():
        as_body = client.post("/v1/caption", content=data)
        as_file = client.post("/v1/caption", files={"image": ("holiday.jpg", data, "image/jpeg")})
        assert as_body.status_code == as_file.status_code == 400
        assert as_body.json()["detail"].startswith(f"request body ({len(data)} bytes): {reason}")
        assert as_file.json()["detail"].startswith(f"upload 'holiday.jpg' ({len(data)} bytes): {reason}")
    refusals = {"empty": client.post("/v1/caption", content=b""),
                "wrong field": client.post("/v1/caption", files={"photo": ("a.jpg", b"x", "image/jpeg")}),
                "no file": client.post("/v1/caption", files={"beam_size": (None, "3")})}
    assert {name: answer.status_code for name, answer in refusals.items()} == dict.fromkeys(refusals, 400)
    assert "empty, no image" in refusals["empty"].json()["detail"]
    assert "the photo goes in the file field 'image', not 'photo'" in refusals["wrong field"].json()["detail"]
    assert "without a file field 'image'" in refusals["no file"].json()["detail"]


def test_body_too_large_gets_413_whatever_it_declares(client, photos):
    limit = 1_000_000

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(20):
            yield b"\0" * 100_000

    answers = [client.post("/v1/caption", content=b"\0" * (limit + 1)),
               client.post("/v1/caption", content=chunks()),
               client.post("/v1/caption", files={"image": ("big.jpg", b"\0" * limit, "image/jpeg")})]
    for answer in answers:
        assert answer.status_code == 413
        assert answer.json()["detail"] == f"request body larger than {limit:,} bytes"
    assert client.post("/v1/caption", content=photos[0]).status_code == 200


CHUNK = 65_536


def raw_upload(url: str, headers: str, head: bytes, limit: int) -> tuple[bytes, int]:
    """Headers, then a chunked body of ``head`` and zeros sent until it is one byte past ``limit``, and then nothing
    more (neither the rest nor its end): what the server answers within 20 s, and the body bytes sent."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20)
    with sock:
        sock.sendall(f"POST /v1/caption HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
        pieces = [head, *[b"\0" * CHUNK] * ((limit - len(head)) // CHUNK), b"\0" * ((limit - len(head)) % CHUNK),
                  b"\0"]  # the last, one byte, crosses the limit: the server has read every byte sent when it does
        for piece in pieces:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer, sum(map(len, pieces))


def test_a_body_too_large_is_refused_as_soon_as_it_crosses_the_limit(tiny_model, photos):
    """The server refuses at the limit, not at the end of the body: the 413 comes though the body never ends (read
    whole first, it would wait for the rest and answer nothing, or 408). Chunked, so that no Content-Length tells in
    advance; as the body and as a multipart upload; and a declared Content-Length too large at once, unsent."""
    limit, boundary = 1_000_000, "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    chunked = "Transfer-Encoding: chunked\r\n"
    with serving(tiny_model, BatchConfig(), limits=ServerLimits(body_timeout_s=60), max_body_bytes=limit) as (url, _):
        for headers, head in [(chunked + "Content-Type: image/jpeg\r\n", b"\xff\xd8"),
                              (chunked + f"Content-Type: multipart/form-data; boundary={boundary}\r\n", part)]:
            answer, sent = raw_upload(url, headers, head, limit)
            assert answer.startswith(b"HTTP/1.1 413 "), (headers, sent, answer[:200])
            assert f"request body larger than {limit:,} bytes".encode() in answer
            assert b"connection: close" in answer.lower() and sent == limit + 1
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20) as sock:
            sock.sendall(f"POST /v1/caption HTTP/1.1\r\nHost: localhost\r\nContent-Length: {10 * limit}\r\n"
                         "\r\n".encode())  # and not one byte of it
            assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
        assert post(url, photos[0]).status_code == 200


def test_health_model_facts_and_openapi(client, tiny_model):
    assert client.get("/v1/health").json() == {"status": "ok", "model": "model", "waiting": 0, "max_queue": 64}
    facts = client.get("/v1/model").json()
    assert facts["generation"] == tiny_model.generation_config.to_dict()
    assert facts["vocabulary_size"] == len(tiny_model.vocab) and facts["engine"] == "PyTorch"
    assert facts["limits"]["max_body_bytes"] == 1_000_000 and facts["model_card"] is None
    schema = client.get("/v1/openapi.json").json()
    assert set(schema["paths"]) == {"/caption", "/health", "/model", "/metrics"}
    documented = {p["name"]: p["schema"] for p in schema["paths"]["/caption"]["post"]["parameters"]}
    assert documented["beam_size"]["maximum"] == 64 and set(documented) == set(GenerationConfig().to_dict())
    assert schema["openapi"].startswith("3.1") and documented["seed"]["type"] == ["integer", "null"]
    assert "nullable" not in str(schema)  # an OpenAPI 3.0 keyword, not of 3.1
    assert client.get("/v1/docs").status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/v1/docs"


def test_the_openapi_document_is_valid_3_1_and_documents_each_option_with_its_bounds(client, tiny_model):
    """Checked by a validator of the OpenAPI 3.1 schema, and each decoding option, as a query parameter and as a
    form field, against its field of GenerationConfig (type, nullability, range and its open ends, choices) and
    the model's default."""
    document = client.get("/v1/openapi.json").json()
    validate(document, cls=OpenAPIV31SpecValidator)
    caption = document["paths"]["/caption"]["post"]
    parameters = {parameter["name"]: parameter for parameter in caption["parameters"]}
    form = caption["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    kinds = {int: "integer", float: "number", bool: "boolean", str: "string"}
    types = field_types(GenerationConfig)
    assert set(parameters) == {item.name for item in fields(GenerationConfig)} == set(form) - {"image"}
    for item in fields(GenerationConfig):
        kind, optional = types[item.name]
        wanted = {"type": [kinds[kind], "null"] if optional else kinds[kind]}
        if "range" in item.metadata:
            low, high = item.metadata["range"]
            open_ends = {"low": {"low"}, "high": {"high"}, "both": {"low", "high"}}.get(item.metadata.get("open"), ())
            wanted["exclusiveMinimum" if "low" in open_ends else "minimum"] = low
            wanted["exclusiveMaximum" if "high" in open_ends else "maximum"] = high
        if "choices" in item.metadata:
            wanted["enum"] = list(item.metadata["choices"])
        if getattr(tiny_model.generation_config, item.name) is not None:  # FastAPI drops every null of the document
            wanted["default"] = getattr(tiny_model.generation_config, item.name)
        parameter = parameters[item.name]
        assert parameter["in"] == "query" and not parameter.get("required", False)
        for schema in (parameter["schema"], form[item.name]):
            bounds = {key: schema[key] for key in ("type", "minimum", "maximum", "exclusiveMinimum",
                                                    "exclusiveMaximum", "enum", "default") if key in schema}
            assert bounds == wanted, item.name


def test_text_options_take_their_fields_types():
    pairs = [("beam_size", "5"), ("length_penalty", "0.5"), ("suppress_unk", "False"), ("seed", ""),
             ("strategy", "beam")]
    assert options_from_text(GenerationConfig, pairs) == {"beam_size": 5, "length_penalty": 0.5,
                                                          "suppress_unk": False, "seed": None, "strategy": "beam"}
    for name, text in [("beam_size", "1_0"), ("beam_size", ""), ("seed", "x"), ("top_p", "1_0")]:
        with pytest.raises(ConfigError, match=f"^{name} must be"):
            options_from_text(GenerationConfig, [(name, text)])


# ---------------------------------------------------------------------------------------- a real server under load
@contextmanager
def serving(model, config: BatchConfig, model_dir=None, limits: ServerLimits | None = None,
            wrap=lambda app: app, max_body_bytes: int = MAX_BODY_BYTES) -> Iterator[tuple[str, Batcher]]:
    """The standalone app (``wrap``ped) under uvicorn with ``captioner serve``'s connection bounds, on a free port of
    127.0.0.1, in a thread, for as long as the block runs."""
    batcher = Batcher(model, config)
    app = wrap(standalone_app(Service.over(batcher, limits, max_body_bytes), model_dir))
    server = uvicorn.Server(server_config(app, limits or ServerLimits(), "127.0.0.1", 0))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", batcher
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@dataclass
class Held:
    """A server whose worker is blocked on its first request until ``release()``, and the images of every batch
    the worker has computed since (or is computing)."""

    url: str
    batcher: Batcher
    pool: ThreadPoolExecutor  # to send more requests from
    first: Future  # the first request's answer
    release: Callable[[], None]
    batches: list[list[bytes]]


@contextmanager
def held_on_first(model, config: BatchConfig, monkeypatch, image: bytes) -> Iterator[Held]:
    entered, release = threading.Event(), threading.Event()
    caption_batch, batches = batcher_module.caption_batch, []

    def held(model, batch):
        batches.append([request.image for request in batch])  # the pixels the decode pool made of each upload
        entered.set()
        release.wait(timeout=30)
        caption_batch(model, batch)

    monkeypatch.setattr(batcher_module, "caption_batch", held)
    with serving(model, config) as (url, batcher), ThreadPoolExecutor(4) as pool:
        try:
            first = pool.submit(post, url, image)
            assert entered.wait(10)
            yield Held(url, batcher, pool, first, release.set, batches)
        finally:
            release.set()


def post(url: str, image: bytes, options: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/caption", content=image, params=options, timeout=60)


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow  # about 20 photos through the CNN, and a half-second window
def test_a_burst_of_good_and_corrupt_uploads_gets_each_its_own_answer(tiny_model, photos, corrupt):
    """One batch (a long window) of photos under two decoding configs and corrupt uploads: each photo gets what
    it gets alone, each corrupt upload its own 400, and the batch held them all."""
    good = [(image, options) for image in photos[:3] for options in (None, WIDE)]
    bad = [data for data, _ in corrupt.values()]
    burst = [*good, *[(data, None) for data in bad]]
    with serving(tiny_model, BatchConfig(max_batch=64, batch_window_ms=500)) as (url, _):
        with ThreadPoolExecutor(len(burst)) as pool:
            answers = list(pool.map(lambda request: post(url, *request), burst))
        alone = [post(url, image, options).json() for image, options in good]  # one at a time, after the burst
        for (image, options), answer, single in zip(good, answers, alone):
            assert answer.status_code == 200
            wanted = expected(tiny_model, image, **{k: int(v) for k, v in (options or {}).items()})
            assert_same_captions(answer.json()["captions"], wanted)
            assert_same_captions(single["captions"], wanted)
            assert single["timing"]["batch_size"] == 1
        for (data, reason), answer in zip(corrupt.values(), answers[len(good):]):
            assert answer.status_code == 400 and reason in answer.json()["detail"]
        sizes = [answer.json()["timing"]["batch_size"] for answer in answers[:len(good)]]
        assert max(sizes) > len(good) // 2, sizes  # photos of both configs, and corrupt uploads, in one batch
        assert post(url, photos[0]).status_code == 200


def test_queue_full_gets_503_then_the_server_serves_again(tiny_model, photos, monkeypatch):
    config = BatchConfig(max_batch=1, max_queue=2, batch_window_ms=0)
    with held_on_first(tiny_model, config, monkeypatch, photos[0]) as held:
        queued = [held.pool.submit(post, held.url, photo) for photo in photos[1:3]]
        wait_for(lambda: held.batcher.waiting == 2)
        refused = post(held.url, photos[3])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        # refused before its body is read: three requests are in the server, the bound of max_queue + max_batch
        assert refused.json()["detail"].startswith("the server is busy (3 requests in progress)")
        assert httpx.get(f"{held.url}/v1/health").json()["waiting"] == 2
        held.release()
        assert [future.result().status_code for future in [held.first, *queued]] == [200, 200, 200]
        assert post(held.url, photos[3]).json()["captions"][0]["text"] == tiny_model.caption(photos[3])


def test_a_request_past_its_deadline_gets_503_and_is_never_computed(tiny_model, photos, monkeypatch):
    config = BatchConfig(max_batch=1, deadline_s=0.5, batch_window_ms=0)
    with held_on_first(tiny_model, config, monkeypatch, photos[0]) as held:
        late = post(held.url, photos[1])
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert late.json()["detail"].startswith("the server did not answer within 0.5 s")
        held.release()
        assert held.first.result().status_code == 503  # held past its deadline too
        wait_for(lambda: held.batcher.waiting == 0)
        assert post(held.url, photos[1]).status_code == 200
        # the late request's first turn was skipped
        assert [[pixels.shape for pixels in batch] for batch in held.batches] == [[(3, 224, 224)]] * 2
        assert torch.equal(held.batches[1][0], tiny_model.encoder.pixels(photos[1]))


def test_a_client_gone_mid_upload_costs_one_log_line(tiny_model, photos, caplog):
    with server_errors() as errors, serving(tiny_model, BatchConfig()) as (url, _):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n" + photos[0][:1000])
        wait_for(lambda: "the client disconnected before its upload was complete" in caplog.text)
        assert post(url, photos[0]).status_code == 200
    assert not errors, [logging.Formatter().format(record) for record in errors]


class Kept(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        if record not in self.records:  # one handler on several loggers of one record's path
            self.records.append(record)


@contextmanager
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """The records of ERROR or worse logged during the block, uvicorn's tracebacks included.

    caplog cannot be trusted with those: its handler is on the root logger, and once any server in the process
    has applied uvicorn's default logging config (Gradio's ``launch`` does, and test_app.py runs first), the
    ``uvicorn`` logger no longer propagates, so "Exception in ASGI application" goes to stderr unseen. The
    handler here sits on uvicorn's loggers themselves, and on asyncio's and the root's."""
    records: list[logging.LogRecord] = []
    handler = Kept(records)
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "asyncio", "")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_the_error_check_sees_uvicorns_tracebacks_where_caplog_does_not(tiny_model, photos, caplog, monkeypatch):
    """The check above can fail: an exception escaping the application is seen, with its traceback, though the
    ``uvicorn`` logger does not propagate (as after Gradio's launch)."""
    monkeypatch.setattr(logging.getLogger("uvicorn"), "propagate", False)

    def failing(app):
        async def application(scope, receive, send):
            if scope["type"] == "http" and scope["path"] == "/v1/caption":
                while (await receive()).get("more_body"):  # the body read first: refused mid-upload, a client
                    pass                                     # still sending may see a reset instead of the 500
                raise RuntimeError("injected failure")
            await app(scope, receive, send)
        return application

    with server_errors() as errors, serving(tiny_model, BatchConfig(), wrap=failing) as (url, _):
        assert post(url, photos[0]).status_code == 500
        assert httpx.get(f"{url}/v1/health").status_code == 200
    failures = [record for record in errors if record.exc_info and "injected failure" in str(record.exc_info[1])]
    assert [record.name for record in failures] == ["uvicorn.error"], [record.getMessage() for record in errors]
    assert not [record for record in caplog.records if record in failures]  # what the check used to rely on


# ---------------------------------------------------------------------------------------- the batcher
def test_submit_to_a_full_queue_is_refused_at_once(tiny_model, photos):
    batcher = Batcher(tiny_model, BatchConfig(max_queue=2))  # not started: nothing leaves the queue
    config = tiny_model.generation_config
    futures = [batcher.submit(photo, config) for photo in photos[:2]]
    with pytest.raises(BusyError, match=r"^the server is busy \(2 requests are waiting\)"):
        batcher.submit(photos[2], config)
    batcher.close()
    for future in futures:
        with pytest.raises(BusyError, match="shutting down"):
            future.result()


def test_seeded_samples_equal_captioners_in_a_batch(tiny_model, photos):
    """Sampling draws its random numbers per batch: a seeded request must be decoded alone to repeat."""
    config = tiny_model.generation_config.updated(strategy="sample", seed=7, num_return_sequences=2)
    batcher = Batcher(tiny_model, BatchConfig(batch_window_ms=300))
    futures = [batcher.submit(photo, config) for photo in photos[:3]]
    batcher.start()
    try:
        for photo, future in zip(photos, futures):
            result = future.result(timeout=30)
            assert result.timing.batch == 3
            assert [c.text for c in result.prediction.captions] == [c["text"] for c in expected(
                tiny_model, photo, strategy="sample", seed=7, num_return_sequences=2)]
    finally:
        batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(tiny_model, photos, monkeypatch, caplog):
    batcher = Batcher(tiny_model, BatchConfig(batch_window_ms=0)).start()
    config = tiny_model.generation_config
    try:
        with monkeypatch.context() as patched:
            patched.setattr(tiny_model, "encode_pixels", lambda pixels: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                batcher.submit(photos[0], config).result(timeout=30)
            with pytest.raises(ImageError, match="not an image"):
                batcher.submit(b"not an image", config).result(timeout=30)
        assert "captioning a batch of 1 failed" in caplog.text
        assert batcher.caption(photos[0], config).prediction.captions[0].text == tiny_model.caption(photos[0])
    finally:
        batcher.close()


# ---------------------------------------------------------------------------------------- the servers
@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "max_batch must be between 1 and 256, not 0"),
    (["--batch-window-ms", "5000"], "batch_window_ms must be between 0 and 1000, not 5000.0"),
    (["--port", "70000"], "--port must be between 1 and 65535, not 70000"),
])
def test_serve_refuses_bad_options_before_loading(args, message, capsys):
    for command in ("serve", "demo"):
        assert main([command, "--model", "/nonexistent", *args]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # starts a Python process with torch
def test_captioner_serve_serves_the_api(tiny_model, tiny_model_dir, photos, tmp_path):
    port = free_port()
    with open(tmp_path / "log", "w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--model", str(tiny_model_dir),
                                   "--port", str(port), "--engine", "torch", "--device", "cpu"], cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: server.poll() is not None or _answers(f"{url}/v1/health"), 120)
            assert server.poll() is None, log.seek(0) or log.read()
            assert post(url, photos[0]).json()["captions"][0]["text"] == tiny_model.caption(photos[0])
        finally:
            server.terminate()
            server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow  # launches Gradio
def test_the_demo_serves_the_api_beside_its_page(tiny_model, tiny_model_dir, photos):
    import torch
    from gradio_client import Client, handle_file

    from captioner.serve.webapp import caption_photo, launch

    grad = torch.is_grad_enabled()
    demo = launch(str(tiny_model_dir), "127.0.0.1", free_port(), device="cpu", block=False, engine="torch")
    try:
        url = demo.local_url.rstrip("/")
        assert httpx.get(f"{url}/v1/health").json()["status"] == "ok"
        assert post(url, photos[0]).json()["captions"][0]["text"] == tiny_model.caption(photos[0])
        best, *_, timing = Client(url, verbose=False).predict(handle_file(str(PHOTOS[0])), api_name="/caption")
        assert best == caption_photo(tiny_model, str(PHOTOS[0])).best and "batch of 1" in timing
        assert httpx.get(url).status_code == 200
    finally:
        demo.close()
        torch.set_grad_enabled(grad)
