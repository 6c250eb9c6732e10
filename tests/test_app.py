"""The Gradio demo, served for real: the API through gradio_client, and the page in headless Chromium."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from captioner.serve.webapp import caption_photo
from conftest import ROOT, need
from synthetic import png_header

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: `pytest -m "not slow"` skips them

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERVER_LOGS: dict[str, Path] = {}  # url -> the server's console output


def serve(args: list[str], tmp_path_factory):
    """Run `python app.py ARGS` on a free port until the module's tests are done; yield its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_PORT": str(port)}
    log_path = tmp_path_factory.mktemp("app-log") / "server.log"
    log = open(log_path, "w+")
    process = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    SERVER_LOGS[url] = log_path
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    else:
        process.kill()
    if process.poll() is not None:
        log.seek(0)
        pytest.fail(f"app.py did not start:\n{log.read()[-3000:]}")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    model_dir = trained_model.save_pretrained(tmp_path_factory.mktemp("app") / "model")
    yield from serve(["--model", str(model_dir)], tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def test_api_captions_a_photo(client, synthetic, trained_model):
    from gradio_client import handle_file

    image = sorted((synthetic / "images").glob("test_*.png"))[0]
    result = client.predict(handle_file(str(image)), api_name="/caption")
    assert isinstance(result[0], str) and result[0] == caption_photo(trained_model, str(image)).best


def test_api_reports_bad_uploads_and_keeps_serving(client, synthetic, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    not_image = tmp_path / "notes.jpg"
    not_image.write_text("definitely not a photo")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((sorted((synthetic / "images").glob("test_*.png"))[0]).read_bytes()[:200])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(30000, 30000))
    for bad, reason in ((not_image, "notes.jpg: not an image"), (truncated, "truncated.png: truncated"),
                        (empty, "empty.png: empty file"), (bomb, "bomb.png: image dimensions are above the limit")):
        with pytest.raises(AppError, match=reason):
            client.predict(handle_file(str(bad)), api_name="/caption")
    good = sorted((synthetic / "images").glob("test_*.png"))[1]
    assert client.predict(handle_file(str(good)), api_name="/caption")[0]


def test_server_logs_one_line_per_refused_upload(client, server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "scribble.png"
    bad.write_text("not an image either")
    with pytest.raises(AppError):
        client.predict(handle_file(str(bad)), api_name="/caption")
    time.sleep(1)
    console = SERVER_LOGS[server].read_text()
    assert "refused a request: scribble.png: not an image" in console and "Traceback" not in console


def test_server_logs_one_line_per_refused_setting(client, server, synthetic):
    """Gradio's own checks (a slider's range, a radio's choices, a slider given text) refuse these; its queue
    printed a traceback for each."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image = handle_file(str(sorted((synthetic / "images").glob("test_*.png"))[2]))
    refused = {("Beam search", 99, 1.0, 3, 12): "Value 99 is greater than maximum value 10",
               ("Sideways", 3, 1.0, 3, 12): "Value: 'Sideways' (type: <class 'str'>) is not in the list of choices",
               ("Beam search", 3, 1.0, "many", 12): "Could not preprocess input component at index 4 (a `slider` component)"}
    for settings, reason in refused.items():
        with pytest.raises(AppError, match=re.escape(reason)):
            client.predict(image, *settings, api_name="/caption")
    assert client.predict(image, "Greedy", 3, 1.0, 1, 12, api_name="/caption")[0]  # and it keeps serving
    time.sleep(1)
    console = SERVER_LOGS[server].read_text()
    assert "Traceback" not in console
    for reason in refused.values():
        lines = [line for line in console.splitlines() if reason in line]
        assert len(lines) == 1 and lines[0].startswith(f"refused a request: {reason}"), lines


def test_default_strategy_is_the_models_own_and_named_in_the_timing(trained_model, synthetic):
    image = str(sorted((synthetic / "images").glob("test_*.png"))[2])
    result = caption_photo(trained_model, image, strategy=None, num_captions=2)
    config = trained_model.generation_config
    assert f"(beam search of {max(config.beam_size, 2)}, mobilenet_v2, cpu" in result.timing
    assert result.rows == caption_photo(trained_model, image, strategy="Beam search", num_captions=2).rows


def test_api_sees_the_original_upload_like_the_python_api(client, trained_model, tmp_path):
    """A 16-bit greyscale PNG: Gradio's own preprocessing would re-encode it (all white); ours reads the file."""
    import numpy as np
    from gradio_client import handle_file
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert client.predict(handle_file(str(path)), api_name="/caption")[0] == trained_model.caption(path)


def test_api_errors_name_the_upload_not_the_server_paths(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(AppError) as error:
        client.predict(handle_file(str(bad)), api_name="/caption")
    message = str(error.value)
    assert "holiday.png" in message and str(ROOT) not in message and "/tmp" not in message


def test_api_accepts_decoding_options(client, synthetic):
    from gradio_client import handle_file

    image = handle_file(str(sorted((synthetic / "images").glob("test_*.png"))[2]))
    best, table, words, labels, timing = client.predict(image, "Sampling", 3, 0.7, 2, 12, api_name="/caption")
    assert len(table["data"]) == 2 and best in [row[0] for row in table["data"]]
    assert "ms" in timing and "sample" in timing
    assert [w["token"] for w in words] == [*best.split(), "<end>"]
    assert all(0 < w["probability"] <= 1 for w in words)
    assert len(labels["confidences"]) == 5  # the CNN's ImageNet labels, from the same forward pass


def test_more_captions_than_beams_widens_the_beam(client, synthetic):
    from gradio_client import handle_file

    image = handle_file(str(sorted((synthetic / "images").glob("test_*.png"))[2]))
    _, table, _, _, timing = client.predict(image, "Beam search", 2, 1.0, 4, 12, api_name="/caption")
    assert len(table["data"]) == 4 and "beam search of 4" in timing


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory):
    """The demo as a newcomer meets it: `python app.py`, the bundled model."""
    yield from serve([], tmp_path_factory)


def test_browser_one_click_example_shows_readable_results(bundled_server, tmp_path):
    """At 1280 px: an example click captions at once; the n-best table fits, its numbers are in (0, 1]
    and sorted as shown; every word shows its probability; the page says what the model knows."""
    with chromium_page(bundled_server) as page:
        page.get_by_text("dog and frisbee", exact=True).click()  # no press of the Caption button
        caption = wait_for_caption(page)
        page.wait_for_timeout(500)
        table = page.locator("#nbest")
        # text cut off sideways: an element showing text, clipping it (Gradio keeps empty measuring cells wider)
        overflow = table.evaluate("el => [...el.querySelectorAll('*')].some(c => c.scrollWidth > c.clientWidth + 1 "
                                  "&& getComputedStyle(c).overflowX !== 'visible' && c.innerText.trim() !== '') "
                                  "|| el.scrollWidth > el.clientWidth + 1")
        rows = [r for r in table.locator("[role=row]").all_inner_texts() if "%" in r]
        word_shares = page.locator("#word-confidence .word small").all_inner_texts()
        labels = page.locator("#cnn-labels").inner_text()
        text = page.locator("body").inner_text()
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert caption and not overflow
    shares = [float(row.split("\n")[-2].strip().rstrip("%")) / 100 for row in rows]
    assert len(shares) == 3 and all(0 < s <= 1 for s in shares) and shares == sorted(shares, reverse=True)
    assert len(word_shares) == len(caption.split()) + 1 and all(w.endswith("%") for w in word_shares)
    assert "retriever" in labels or "%" in labels
    assert "Flickr8k" in text and "MS-COCO" in text  # what the bundled model was trained on


def test_browser_upload_and_caption(server, synthetic, trained_model, tmp_path):
    image = sorted((synthetic / "images").glob("test_*.png"))[3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a PNG at all")
    with chromium_page(server) as page:
        page.locator("input[type=file]").first.set_input_files(str(image))  # an upload captions at once
        caption = wait_for_caption(page)
        page.locator("input[type=file]").first.set_input_files(str(broken))
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('not an image')",
                               timeout=60_000)
        error = page.locator("#status").inner_text()
    assert caption == caption_photo(trained_model, str(image)).best
    assert "not an image" in error and str(ROOT) not in error


@contextmanager
def chromium_page(url: str):
    """A 1280x900 page of ``url`` in Debian's headless Chromium (required under CI)."""
    need(Path(CHROMIUM).exists(), "Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            yield page
        finally:
            browser.close()


def wait_for_caption(page) -> str:
    box = page.locator("#best-caption textarea")
    page.wait_for_function("el => el.value.length > 0", arg=box.element_handle(), timeout=60_000)
    return box.input_value()
