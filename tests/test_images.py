"""The one image loader: odd formats are accepted and normalised, hostile inputs refused with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.errors import ImageError
from captioner.data.images import MAX_IMAGE_PIXELS, describe, load_image
from synthetic import png_header


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(width=40, height=30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (height, 1)), np.tile(y[:, None], (1, width)),
                                     np.full((height, width), 128, np.uint8)], -1))


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_modes_become_rgb(mode):
    source = gradient().convert(mode) if mode not in ("I;16",) else Image.fromarray(
        (np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50))
    result = load_image(source)
    assert result.mode == "RGB" and result.size == (40, 30)


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 40 * 30).astype(np.uint16).reshape(30, 40)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels[..., 0])) > 100


def test_transparency_is_flattened_on_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 5, 10))
    pixels = np.asarray(load_image(image))
    assert tuple(pixels[0, 0]) == (0, 0, 255) and tuple(pixels[0, 9]) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert tuple(np.asarray(load_image(palette))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "BMP", "TIFF", "JPEG", "PNG"])
def test_formats_and_files_without_extension(tmp_path, fmt):
    image = gradient()
    path = tmp_path / "photo"  # no extension: the content decides
    path.write_bytes(encoded(image if fmt != "GIF" else image.convert("P"), fmt))
    assert load_image(path).size == (40, 30)
    assert load_image(path.read_bytes()).size == (40, 30)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(load_image(buffer.getvalue()))[0, 0]) == (255, 0, 0)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    result = load_image(encoded(image, "JPEG", exif=exif))
    assert result.size == (20, 40)


@pytest.mark.parametrize("size", [(1, 1), (2000, 1), (1, 2000)])
def test_tiny_and_extreme_aspect_ratios(size):
    assert load_image(Image.new("RGB", size)).size == size


def test_numpy_inputs():
    assert load_image(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert load_image(np.ones((5, 6, 1), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((5, 6, 4), np.uint8)).size == (6, 5)
    assert load_image(np.full((5, 6, 3), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    for bad in (np.zeros((5, 6, 2)), np.zeros((5,)), np.full((3, 3), np.nan)):
        with pytest.raises(ImageError):
            load_image(bad)


def test_rejections_name_the_file_and_reason(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(encoded(gradient(400, 300), "JPEG")[:600])
    cases = {empty: "empty file", text: "not an image", truncated: "truncated",
             tmp_path / "missing.jpg": "file not found", tmp_path: "is a directory"}
    for path, reason in cases.items():
        with pytest.raises(ImageError) as error:
            load_image(path)
        assert str(path) in str(error.value) and reason in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ImageError, match="empty input"):
        load_image(b"")
    with pytest.raises(ImageError, match="unsupported image input"):
        load_image(12345)


def test_decompression_bomb_refused_from_header(tmp_path):
    """A PNG claiming 20000 x 20000 pixels: refused before its pixels are decoded."""
    bomb = png_header(20000, 20000)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(ImageError, match=f"above the limit of {MAX_IMAGE_PIXELS:,}"):
        load_image(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 64), height=st.integers(1, 64),
       mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I", "F", "I;16"]),
       fmt=st.sampled_from([None, "PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"]), seed=st.integers(0, 2**16))
def test_any_generated_image_loads_as_rgb(width, height, mode, fmt, seed):
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(
        rng.integers(0, 65536, (height, width), dtype=np.uint16))
    source = image
    if fmt is not None:
        try:
            source = encoded(image, fmt)
        except (OSError, ValueError, KeyError):
            return  # this format cannot store this mode; nothing to load
    result = load_image(source)
    assert result.mode == "RGB" and result.size == (width, height)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_nan_or_infinity_is_refused_not_black(tmp_path, recwarn, bad):
    """A 32-bit float TIFF (mode F) is stretched over 0-255 by its range: NaN or infinity would make it all black."""
    values = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(30, 40)
    values[3, 5] = bad
    path = tmp_path / "depth.tif"
    Image.fromarray(values, mode="F").save(path, "TIFF")
    assert Image.open(path).mode == "F"
    for source in (path, path.read_bytes(), Image.open(path)):
        with pytest.raises(ImageError) as error:
            load_image(source)
        assert str(error.value) == f"{describe(source)}: image contains NaN or infinite values"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # numpy's invalid-value warnings
    values[3, 5] = 0.5
    Image.fromarray(values, mode="F").save(path, "TIFF")
    assert np.asarray(load_image(path)).max() == 255


# ---------------------------------------------------------------------------------------- drafted JPEG decoding
def photo(width=4096, height=3072) -> Image.Image:
    """A large photo-like image with a marker in its top-left corner, to see orientation survive drafting."""
    image = gradient(width, height)
    image.paste((255, 0, 0), (0, 0, width // 8, height // 8))
    return image


def exif_rotated(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "JPEG", quality=90, exif=exif.tobytes())


@pytest.mark.parametrize("fmt, params", [("JPEG", dict()), ("JPEG", dict(progressive=True)), ("MPO", dict())],
                         ids=["baseline", "progressive", "mpo"])
def test_a_large_jpeg_is_drafted_to_twice_the_side_asked_for(fmt, params):
    data = encoded(photo(), fmt, quality=90, **params)
    drafted, full = load_image(data, min_side=256), load_image(data)
    assert full.size == (4096, 3072)
    assert min(drafted.size) >= 512 and drafted.size == (1024, 768)  # libjpeg at 1/4, the largest scale allowed
    reference = np.asarray(full.resize(drafted.size, Image.Resampling.BOX), np.float64)
    assert np.abs(np.asarray(drafted, np.float64) - reference).mean() < 2  # the same picture, downscaled


@pytest.mark.parametrize("orientation, size", [(6, (768, 1024)), (8, (768, 1024)), (3, (1024, 768))])
def test_a_drafted_jpeg_is_turned_upright_as_a_full_one(orientation, size):
    data = exif_rotated(photo(), orientation)
    drafted, full = load_image(data, min_side=256), load_image(data)
    assert drafted.size == size and full.size == (size[0] * 4, size[1] * 4)
    red = lambda image: np.argwhere((np.asarray(image)[..., 0] > 200) & (np.asarray(image)[..., 1] < 60))  # noqa: E731
    assert np.allclose(red(drafted).mean(0), red(full).mean(0) / 4, atol=3)  # the marker's corner, both ways


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_are_drafted_to_rgb(mode):
    drafted = load_image(encoded(photo().convert(mode), "JPEG", quality=90), min_side=256)
    assert drafted.mode == "RGB" and drafted.size == (1024, 768)


@pytest.mark.parametrize("fmt, size", [("PNG", (4096, 3072)), ("JPEG", (640, 480)), ("JPEG", (1000, 700))])
def test_other_formats_and_photos_too_small_to_draft_decode_whole(fmt, size):
    """A PNG has no reduced-scale decode; a JPEG whose short side is under twice min_side at half scale is
    decoded whole (COCO's and Flickr8k's photos all are: their scores cannot move)."""
    assert load_image(encoded(photo(*size), fmt), min_side=256).size == size


def test_the_encoder_drafts_and_sees_the_photo_it_would_see_whole(tiny_model):
    data = encoded(photo(), "JPEG", quality=90)
    drafted = tiny_model.encoder.pixels(data)
    whole = tiny_model.encoder.preprocess(load_image(data))
    assert drafted.shape == whole.shape and float((drafted - whole).abs().mean()) < 0.02
