"""``captioner serve`` attacked by its clients: slow and idle connections, costly uploads, option text of any
kind, callers without the key, a foreign ``Host``, SIGTERM mid-upload. Each bound holds, the legitimate requests
beside the attack are still answered, and the log says each cause once. Servers on 127.0.0.1 only, every loop
bounded in count and time."""

from __future__ import annotations

import io
import logging
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.cli import main
from captioner.generation.config import GenerationConfig
from captioner.serve.access import AccessGuard
from captioner.serve.batcher import BatchConfig, Batcher
from captioner.serve.http import Service, standalone_app
from captioner.serve.limits import ServerLimits
from captioner.serve.logs import RepeatFilter
from conftest import ROOT
from test_http import PHOTOS, _answers, free_port, post, server_errors, serving, wait_for

KEY = "k" * 12 + "-secret-key"
SLOW_BODY = b"POST /v1/caption HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\nabc"


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [path.read_bytes() for path in PHOTOS]


def connect(url: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
    return sock


def answer_of(sock: socket.socket) -> tuple[bytes, float]:
    """What the server wrote before closing the connection, and how long that took."""
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def png16(size: int) -> bytes:
    """A 16-bit greyscale PNG of size x size: a few KB that decode into gigabytes of work."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- slow and idle clients
@pytest.mark.slow  # seconds of timeouts
def test_stalled_bodies_hold_no_place_and_get_408(tiny_model, photos):
    """Slow bodies used to fill the places meant for the model (every other request got 503); now a request takes
    a place only once its body is in, and a body that stops arriving gets 408 and its connection is closed."""
    limits = ServerLimits(body_timeout_s=1.0, header_timeout_s=30)
    with (server_errors() as errors,
          serving(tiny_model, BatchConfig(max_batch=1, max_queue=1), limits=limits) as (url, _)):
        stalled = [connect(url) for _ in range(6)]  # three times the server's two places
        for sock in stalled:
            sock.sendall(SLOW_BODY)
        answer = post(url, photos[0])
        assert answer.status_code == 200 and answer.json()["captions"][0]["text"] == tiny_model.caption(photos[0])
        for sock in stalled:
            data, took = answer_of(sock)
            assert data.startswith(b"HTTP/1.1 408 ") and b"the request body stopped arriving (3 bytes" in data
            assert took < 5
            sock.close()
    assert not errors, [logging.Formatter().format(record) for record in errors]


@pytest.mark.slow  # seconds of timeouts
def test_headers_that_never_end_and_idle_connections_are_closed(tiny_model, photos):
    limits = ServerLimits(header_timeout_s=0.5, keep_alive_s=0.5)
    with server_errors() as errors, serving(tiny_model, BatchConfig(), limits=limits) as (url, _):
        slowloris, idle = connect(url), connect(url)
        slowloris.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: localhost\r\n")
        for sock in (slowloris, idle):
            data, took = answer_of(sock)
            assert data.startswith(b"HTTP/1.1 408 ") and b"no complete request headers within 0.5 s" in data
            assert took < 5
        kept = connect(url)
        kept.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data, took = answer_of(kept)  # answered, then closed once idle for keep_alive_s
        assert data.startswith(b"HTTP/1.1 200 ") and took < 5
        assert post(url, photos[0]).status_code == 200
    assert not errors, [logging.Formatter().format(record) for record in errors]


def test_connections_past_the_cap_are_refused_at_once_and_logged_once(tiny_model, photos, caplog):
    limits = ServerLimits(max_connections=4, header_timeout_s=30)
    with (filtered(caplog.handler, RepeatFilter(interval_s=60)), server_errors() as errors,
          serving(tiny_model, BatchConfig(), limits=limits) as (url, _)):
        held = [connect(url) for _ in range(4)]
        time.sleep(0.2)
        for _ in range(20):
            with connect(url) as extra:
                data, took = answer_of(extra)
                assert data.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in data and took < 2
        refusals = [r for r in caplog.records if "closed a connection (503)" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        for sock in held:
            sock.close()
        wait_for(lambda: _answers(f"{url}/v1/health"))
        assert post(url, photos[0]).status_code == 200
    assert not errors, [logging.Formatter().format(record) for record in errors]


@contextmanager
def filtered(handler: logging.Handler, repeat: RepeatFilter) -> Iterator[None]:
    """``repeat`` on ``handler`` (as `captioner serve` filters its log's handlers) for the block only: pytest keeps
    caplog's handler for the whole session."""
    handler.addFilter(repeat)
    try:
        yield
    finally:
        handler.removeFilter(repeat)


def test_a_repeated_error_is_one_line_per_interval():
    now = [0.0]
    repeat = RepeatFilter(interval_s=10, clock=lambda: now[0])

    def record(message: str, cause: str | None = None, level: int = logging.WARNING) -> logging.LogRecord:
        made = logging.LogRecord("captioner", level, __file__, 1, message, (), None)
        if cause:
            made.cause = cause
        return made

    assert repeat.filter(record("refused (503): busy", "busy"))
    assert not any(repeat.filter(record(f"refused (503): busy {i}", "busy")) for i in range(1000))
    assert repeat.filter(record("refused (400): option", "option"))  # another cause passes
    assert repeat.filter(record("info", level=logging.INFO))  # below warnings: never held
    now[0] = 11.0
    summary = record("refused (503): busy again", "busy")
    assert repeat.filter(summary) and summary.getMessage() == "refused (503): busy again (1,000 more like it in " \
                                                             "the last 11 s)"


# ---------------------------------------------------------------------------------------- costly uploads
@pytest.mark.slow  # decodes until the budgets stop it
def test_a_costly_upload_fails_alone_and_the_others_are_answered(tiny_model, photos):
    jpeg2000 = io.BytesIO()
    Image.new("RGB", (64, 64)).save(jpeg2000, "JPEG2000")
    costly = {"slow": (png16(7000), "took longer than 0.5 s to decode"),
              "large": (png16(4000), "needs more than 64 MB to decode"),
              "jpeg2000": (jpeg2000.getvalue(), "JPEG2000 images are not accepted here (only JPEG")}
    for name, limits in [("slow", ServerLimits(decode_timeout_s=0.5)),
                         ("large", ServerLimits(decode_memory_mb=64, decode_timeout_s=30)),
                         ("jpeg2000", ServerLimits())]:
        data, reason = costly[name]
        with (server_errors() as errors, serving(tiny_model, BatchConfig(), limits=limits) as (url, _),
              ThreadPoolExecutor(8) as pool):
            bad = [pool.submit(post, url, data) for _ in range(4)]
            good = [pool.submit(post, url, photo) for photo in photos]
            for future in bad:
                answer = future.result()
                assert answer.status_code == 400 and f"request body ({len(data)} bytes): " in answer.json()["detail"]
                assert reason in answer.json()["detail"], answer.json()
            for photo, future in zip(photos, good):
                assert future.result().json()["captions"][0]["text"] == tiny_model.caption(photo)
        assert not errors, (name, [logging.Formatter().format(record) for record in errors])


# ---------------------------------------------------------------------------------------- options of any text
@pytest.fixture(scope="module")
def client(tiny_model):
    with TestClient(standalone_app(Service.over(Batcher(tiny_model, BatchConfig(batch_window_ms=0))))) as test_client:
        yield test_client


OPTION_TEXT = st.one_of(st.text(max_size=50), st.from_regex(r"[+-]?[0-9]{1,6000}", fullmatch=True),
                        st.sampled_from(["nan", "inf", "-inf", "1e400", "true", "none", "", "0x10", "1_0"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([item for item in GenerationConfig().to_dict()]), text=OPTION_TEXT,
       as_form=st.booleans())
def test_any_option_text_gets_an_answer_or_400_never_500(client, photos, name, text, as_form):
    if as_form:
        answer = client.post("/v1/caption", data={name: text}, files={"image": ("a.jpg", photos[0], "image/jpeg")})
    else:
        answer = client.post("/v1/caption", params={name: text}, content=photos[0])
    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 400:
        detail = answer.json()["detail"]
        assert name in detail and "\n" not in detail and len(detail) < 300


def test_thousands_of_unknown_options_get_one_short_line(client, photos):
    answer = client.post("/v1/caption", params={f"option{i}": "1" for i in range(3000)}, content=photos[0])
    assert answer.status_code == 400
    assert answer.json()["detail"] == ("unknown decoding option(s) option0, option1, option10, option100, "
                                       "option1000 and 2,995 more")


def test_multipart_refusals_are_ours_and_logged(client, photos, caplog):
    no_boundary = client.post("/v1/caption", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    two_files = client.post("/v1/caption", files=[("image", ("a.jpg", photos[0])), ("image", ("b.jpg", photos[1]))])
    for answer in (no_boundary, two_files):
        assert answer.status_code == 400 and answer.json()["detail"].startswith("multipart upload: ")
    assert "Too many files" in two_files.json()["detail"]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a request (400): multipart")]
    assert len(logged) == 2, logged


def test_metrics_count_requests_refusals_and_batches(client, photos):
    assert client.post("/v1/caption", content=photos[0]).status_code == 200
    assert client.post("/v1/caption", params={"beam_size": "0"}, content=photos[0]).status_code == 400
    assert client.post("/v1/caption", content=b"not a photo").status_code == 400
    text = client.get("/metrics").text
    assert text == client.get("/v1/metrics").text.replace('route="/metrics"', 'route="/metrics"')

    def value(line_start: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])

    assert value('captioner_requests_total{route="/caption",status="200"}') >= 1
    assert value('captioner_requests_total{route="/caption",status="400"}') >= 2
    assert value('captioner_refusals_total{reason="option"}') >= 1
    assert value('captioner_refusals_total{reason="image"}') >= 1
    assert value("captioner_batch_size_count") >= 1 and value("captioner_queue_depth") == 0
    assert value('captioner_request_seconds_count{route="/caption"}') >= 3


# ---------------------------------------------------------------------------------------- who may call
def test_an_api_key_is_required_but_for_health_and_hosts_must_be_loopback(tiny_model, photos):
    refused: list[str] = []
    guard = lambda app: AccessGuard(app, KEY, loopback_hosts=True, on_refused=refused.append)  # noqa: E731
    with serving(tiny_model, BatchConfig(), wrap=guard) as (url, _):
        assert httpx.get(f"{url}/v1/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            answer = httpx.post(f"{url}/v1/caption", content=photos[0], headers=headers)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            assert "missing or wrong API key" in answer.json()["detail"]
        assert httpx.get(f"{url}/metrics").status_code == 401
        good = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(f"{url}/v1/caption", content=photos[0], headers=good).status_code == 200
        rebound = httpx.post(f"{url}/v1/caption", content=photos[0], headers={**good, "Host": "evil.example:80"})
        assert rebound.status_code == 400 and "Host 'evil.example:80' is not a loopback name" in rebound.text
        assert httpx.get(f"{url}/v1/health", headers={"Host": f"localhost:{url.rsplit(':', 1)[1]}"}).status_code == 200
    assert refused == ["auth"] * 4 + ["host"]


@pytest.mark.parametrize("args, env, message", [
    (["--host", "0.0.0.0"], {}, "--host 0.0.0.0 is reachable from the network and no API key is set"),
    (["--host", "0.0.0.0", "--no-auth"], {"CAPTIONER_API_KEY": KEY}, "--no-auth and an API key"),
    ([], {"CAPTIONER_API_KEY": "short"}, "$CAPTIONER_API_KEY: an API key must be at least 16 printable"),
    (["--api-key-file", "/dev/zero"], {}, "/dev/zero: API key file is not a regular file (a device)"),
    (["--header-timeout-s", "0"], {}, "header_timeout_s must be between 0.1 and 600, not 0.0"),
    (["--max-connections", "999999"], {}, "max_connections 999,999 is more than this process's descriptor limit"),
])
def test_serve_refuses_unsafe_or_bad_access_options_before_loading(args, env, message, capsys, monkeypatch):
    monkeypatch.delenv("CAPTIONER_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", "/nonexistent", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------- shutdown
@pytest.mark.slow  # starts a Python process with torch
def test_sigterm_cuts_a_half_sent_upload_and_exits_within_the_drain_time(tiny_model_dir, photos, tmp_path):
    port, key_file = free_port(), tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with open(tmp_path / "log", "w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--model", str(tiny_model_dir),
                                   "--port", str(port), "--engine", "torch", "--device", "cpu", "--api-key-file",
                                   str(key_file), "--shutdown-timeout-s", "5"], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: server.poll() is not None or _answers(f"{url}/v1/health"), 120)
            assert httpx.post(f"{url}/v1/caption", content=photos[0]).status_code == 401
            headers = {"Authorization": f"Bearer {KEY}"}
            assert httpx.post(f"{url}/v1/caption", content=photos[0], headers=headers).status_code == 200
            half = connect(url)
            half.sendall(SLOW_BODY.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()))
            time.sleep(0.5)
            stopping = time.monotonic()
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) is not None
            assert time.monotonic() - stopping < 5, "the half-sent upload held the drain"
            assert answer_of(half)[0] == b""  # cut, not answered
        finally:
            if server.poll() is None:
                server.kill()
        log.seek(0)
        assert "Traceback" not in log.read()


@pytest.mark.slow  # starts a Python process with torch
def test_a_flood_of_idle_sockets_never_exhausts_descriptors_or_fills_the_log(tiny_model_dir, photos, tmp_path):
    """Under a 512-descriptor limit, 400 idle sockets: those past the cap (512 - 320) are refused at once, the
    others closed by the header timeout, the log gets a few lines (no EMFILE tracebacks), and the server serves.
    (Without the cap, 1,100 idle sockets under 1,024 descriptors made /v1/health time out and wrote 1.6 million
    lines of accept tracebacks in 40 s.)"""
    port = free_port()
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))  # noqa: E731
    with open(tmp_path / "log", "w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--model", str(tiny_model_dir),
                                   "--port", str(port), "--engine", "torch", "--device", "cpu",
                                   "--header-timeout-s", "2"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=limit)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: server.poll() is not None or _answers(f"{url}/v1/health"), 120)
            flood = [connect(url) for _ in range(400)]
            answers = []
            for sock in flood:  # each answered: 503 past the cap, 408 when its header timeout comes
                sock.settimeout(10)
                answers.append(answer_of(sock)[0][:13])
                sock.close()
            assert set(answers) == {b"HTTP/1.1 503 ", b"HTTP/1.1 408 "}, set(answers)
            wait_for(lambda: _answers(f"{url}/v1/health"), 10)
            assert post(url, photos[0]).status_code == 200
        finally:
            server.terminate()
            server.wait(timeout=30)
        log.seek(0)
        lines = log.read().splitlines()
    assert not [line for line in lines if "Traceback" in line or "Too many open files" in line], "\n".join(lines)
    assert sum("closed a connection" in line for line in lines) <= 4, lines
