"""Phones' HEIC/HEIF and AVIF photos (issue 33): decoded as the pixels they were saved from, turned upright once,
found in folders, captioned by the API, the CLI, the HTTP server and the demo, and bounded as every other format.
Every file here is written by the test (Pillow saves AVIF, pillow-heif HEIF)."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from captioner.cli import main
from captioner.data.images import IMAGE_EXTENSIONS, load_image
from captioner.errors import ImageError
from captioner.serve.batcher import BatchConfig, Batcher
from captioner.serve.decode_pool import PHOTO_FORMATS
from captioner.serve.http import Service, standalone_app
from synthetic import png_header

# Near-lossless settings (quality -1 is HEIF's lossless; both keep full-resolution chroma) and a phone's (lossy,
# chroma at half resolution), with the mean and largest error each may have against the source.
SETTINGS = {"HEIF": {"near-lossless": (dict(quality=-1, chroma=444), 0.5, 2),
                     "phone": (dict(quality=90), 2.5, 24)},
            "AVIF": {"near-lossless": (dict(quality=100, subsampling="4:4:4"), 1.0, 4),
                     "phone": (dict(quality=90), 2.5, 100)}}  # AVIF's 4:2:0 smears the marker's red edge
SUFFIX = {"HEIF": ".heic", "AVIF": ".avif"}
ORIENTATION = 0x0112


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def picture(width: int = 96, height: int = 64) -> Image.Image:
    """Smooth gradients (what lossy codecs keep) and a red block in the top-left corner, to see orientation."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    pixels[:height // 4, :width // 4] = (230, 20, 20)
    return Image.fromarray(pixels)


def difference(a: Image.Image, b: Image.Image) -> np.ndarray:
    assert a.size == b.size and a.mode == b.mode == "RGB"
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))


def claiming(data: bytes, width: int, height: int) -> bytes:
    """``data`` whose one ``ispe`` box (the image's size in an HEIF or AVIF header) claims ``width`` x ``height``."""
    assert data.count(b"ispe") == 1
    at = data.index(b"ispe") + 8  # after the box type and its version and flags
    return data[:at] + struct.pack(">II", width, height) + data[at + 8:]


def reason(error: pytest.ExceptionInfo, source) -> str:
    """An ImageError's one line without the input's name, which differs by input."""
    message = str(error.value)
    assert message.startswith(f"{source}: ") and "\n" not in message
    return message[len(f"{source}: "):]


# ---------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("setting", ["near-lossless", "phone"])
@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_decodes_the_pixels_it_was_saved_from(tmp_path, fmt, setting):
    params, mean, largest = SETTINGS[fmt][setting]
    source = picture()
    data = encoded(source, fmt, **params)
    assert Image.open(io.BytesIO(data)).format == fmt and fmt in PHOTO_FORMATS  # the name the server allows
    path = tmp_path / f"IMG_0001{SUFFIX[fmt]}"
    path.write_bytes(data)
    for given in (path, str(path), data, Image.open(path)):
        error = difference(load_image(given), source)
        assert error.mean() < mean and error.max() <= largest, (type(given), error.mean(), error.max())


def test_a_tiled_heic_as_iphones_save_them_decodes_whole():
    """iPhones store a photo as a grid of 512-pixel HEVC tiles; here 256-pixel tiles, the last row and column cut."""
    source = picture(640, 480)
    data = encoded(source, "HEIF", quality=-1, chroma=444, tile_size=256)
    assert Image.open(io.BytesIO(data)).info["tiling"]["num_columns"] == 3
    error = difference(load_image(data), source)
    assert error.mean() < 0.5 and error.max() <= 2


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_exif_orientation_turns_the_photo_upright_once(fmt, orientation):
    """HEIF stores the turn as a transform that libheif applies (the EXIF tag then reads 1), AVIF's Pillow turns
    back into the EXIF tag that the loader applies: each photo comes out as the JPEG with the same tag does."""
    source = picture()
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    tagged = source.copy()
    tagged.info["exif"] = exif.tobytes()
    upright = ImageOps.exif_transpose(tagged)  # what the tag means, applied once
    assert upright.size == (source.size[::-1] if orientation in (6, 8) else source.size)
    params = SETTINGS[fmt]["near-lossless"][0]
    result = load_image(encoded(source, fmt, exif=exif.tobytes(), **params))
    assert difference(result, upright).mean() < 1.0  # not the source, nor turned twice (180 degrees from it)
    for wrong in [source, source.rotate(180)] if orientation != 3 else [source]:
        assert wrong.size != result.size or difference(result, wrong).mean() > 20
    as_jpeg = load_image(encoded(source, "JPEG", quality=95, exif=exif.tobytes()))
    assert difference(result, as_jpeg).mean() < 3


# ---------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("size", [(10000, 8000), (8000, 6300), (30000, 30000)])
@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_too_many_pixels_are_refused_from_the_header_as_a_png_is(tmp_path, fmt, size):
    """A header claiming more than MAX_IMAGE_PIXELS: refused unread, with the very line a PNG of that size gets.
    (libavif refuses more than 16384 x 16384 pixels itself, as not an AVIF at all: still unread.)"""
    bomb = claiming(encoded(picture(256, 128), fmt), *size)
    path = tmp_path / f"bomb{SUFFIX[fmt]}"
    path.write_bytes(bomb)
    with pytest.raises(ImageError) as png_error:
        load_image(png_header(*size))
    for source in (path, bomb):
        with pytest.raises(ImageError) as error:
            load_image(source)
        wanted = "not an image (unrecognised file format)" if fmt == "AVIF" and size == (30000, 30000) else \
            reason(png_error, f"<{len(png_header(*size))} bytes>")
        assert reason(error, path if source is path else f"<{len(bomb)} bytes>") == wanted


@pytest.mark.parametrize("how", ["crop", "tiles"])
def test_a_heif_storing_more_pixels_than_it_shows_is_refused(how):
    """What libheif decodes is its coded size, before a crop (``clap``) or of all the tiles of a grid: a header
    may show few pixels and store too many (here claimed by the stored ``ispe`` box)."""
    if how == "crop":  # 64 x 48 is coded as 64 x 64, cropped
        shown, stored = (64, 48), (10000, 10000)
        data = claiming(encoded(picture(*shown), "HEIF"), *stored)
    else:  # 3 x 2 tiles, each claiming 3000 x 3000
        shown, stored = (640, 480), (9000, 6000)
        data = encoded(picture(*shown), "HEIF", tile_size=256)
        at = data.rindex(b"ispe") + 8  # the tiles' size, after the whole grid's
        data = data[:at] + struct.pack(">II", 3000, 3000) + data[at + 8:]
    assert Image.open(io.BytesIO(data)).size == shown
    with pytest.raises(ImageError) as error:
        load_image(data)
    assert reason(error, f"<{len(data)} bytes>") == (
        f"image is stored as {stored[0]}x{stored[1]} pixels (tiles or a crop around its {shown[0]}x{shown[1]}), "
        "above the limit of 50,000,000 pixels (possible decompression bomb)")


def test_a_corrupt_heic_or_avif_is_one_line(tmp_path):
    for fmt in ("HEIF", "AVIF"):
        cut = encoded(picture(), fmt)[:-40]
        with pytest.raises(ImageError) as error:
            load_image(cut)
        assert "\n" not in str(error.value) and "truncated or corrupt" in str(error.value)


# ---------------------------------------------------------------------------------------- every path
@pytest.fixture(scope="module")
def phone_photos(tmp_path_factory) -> dict[str, bytes]:
    """Photos as phones name them, each a different picture, and one JPEG."""
    folder = tmp_path_factory.mktemp("phone")
    turns = list(Image.Transpose)
    photos = {"IMG_0001.HEIC": ("HEIF", 0), "IMG_0002.heic": ("HEIF", 1), "shot.heif": ("HEIF", 2),
              "camera.hif": ("HEIF", 3), "PXL_0003.avif": ("AVIF", 4), "old.jpg": ("JPEG", 5)}
    for name, (fmt, turn) in photos.items():
        (folder / name).write_bytes(encoded(picture(160, 120).transpose(turns[turn]), fmt))
    return {name: (folder / name).read_bytes() for name in photos}


def test_folders_find_phone_extensions_whatever_their_case(phone_photos, tmp_path):
    for name in phone_photos:
        assert (tmp_path / name).suffix.lower() in IMAGE_EXTENSIONS


def test_captioner_caption_folder_captions_heic_and_avif(tiny_model, tiny_model_dir, phone_photos, tmp_path,
                                                          capsys):
    """`captioner caption DIR`, its photos loaded by a worker process; each caption is the Python API's."""
    for name, data in phone_photos.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("not a photo")
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(tmp_path), "--model", str(tiny_model_dir), "--out", str(out), "--num-workers", "1",
                 "-q"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == sorted(str(tmp_path / name) for name in phone_photos)
    assert [r["captions"][0]["text"] for r in records] == tiny_model.caption([r["file"] for r in records])
    assert len({tuple(r["labels"][0].values()) for r in records}) > 1  # six pictures, not one decoded six times
    assert main(["caption", str(tmp_path / "IMG_0001.HEIC"), "--model", str(tiny_model_dir), "-q"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'IMG_0001.HEIC'}\t{tiny_model.caption(phone_photos['IMG_0001.HEIC'])}\n"


@pytest.fixture(scope="module")
def client(tiny_model) -> Iterator[TestClient]:
    with TestClient(standalone_app(Service.over(Batcher(tiny_model, BatchConfig(batch_window_ms=0))))) as test_client:
        yield test_client


@pytest.mark.parametrize("name", ["IMG_0001.HEIC", "PXL_0003.avif"])
def test_the_http_api_captions_heic_and_avif(client, tiny_model, phone_photos, name):
    """Through the server's decode pool, which opens only PHOTO_FORMATS."""
    data = phone_photos[name]
    mime = "image/heic" if name.endswith("HEIC") else "image/avif"
    as_body = client.post("/v1/caption", content=data, headers={"content-type": mime})
    as_file = client.post("/v1/caption", files={"image": (name, data, mime)})
    for answer in (as_body, as_file):
        assert answer.status_code == 200, answer.text
        assert answer.json()["captions"][0]["text"] == tiny_model.caption(data)
        assert [(label["label"], label["probability"]) for label in answer.json()["labels"]] == \
            tiny_model.classify(data)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_the_http_api_refuses_too_many_pixels_as_for_a_png(client, fmt):
    bomb, png = claiming(encoded(picture(256, 128), fmt), 10000, 8000), png_header(10000, 8000)
    answers = [client.post("/v1/caption", content=data) for data in (bomb, png)]
    assert [a.status_code for a in answers] == [400, 400]
    details = [a.json()["detail"] for a in answers]
    assert details[0] == details[1].replace(f"({len(png)} bytes)", f"({len(bomb)} bytes)")
    assert "above the limit of 50,000,000 pixels" in details[0]


def test_the_demo_captions_an_uploaded_heic_and_avif(tiny_model, phone_photos, tmp_path):
    """The page hands the loader the uploaded file itself (``original_upload``), as Gradio stores it."""
    import gradio as gr
    from gradio.data_classes import FileData

    from captioner.serve.webapp import build_demo, caption_photo

    demo = build_demo(tiny_model, bundled=False)
    image = next(block for block in demo.blocks.values() if isinstance(block, gr.Image))
    for name in ("IMG_0001.HEIC", "PXL_0003.avif"):
        path = tmp_path / name
        path.write_bytes(phone_photos[name])
        given = image.preprocess(FileData(path=str(path), orig_name=name))
        assert given == str(path)
        assert caption_photo(tiny_model, given, num_captions=1).best == tiny_model.caption(path)


@pytest.mark.slow  # launches Gradio
def test_the_served_demo_captions_heic_and_avif_uploads(tiny_model, tiny_model_dir, phone_photos, tmp_path):
    """Uploaded through Gradio's own route, as a browser's file picker does."""
    import torch
    from gradio_client import Client, handle_file

    from captioner.serve.webapp import caption_photo, launch
    from test_http import free_port

    grad = torch.is_grad_enabled()
    demo = launch(str(tiny_model_dir), "127.0.0.1", free_port(), device="cpu", block=False, engine="torch")
    try:
        client = Client(demo.local_url, verbose=False)
        for name in ("IMG_0001.HEIC", "PXL_0003.avif"):
            path = tmp_path / name
            path.write_bytes(phone_photos[name])
            best, *_ = client.predict(handle_file(str(path)), api_name="/caption")
            assert best == caption_photo(tiny_model, str(path)).best
    finally:
        demo.close()
        torch.set_grad_enabled(grad)
