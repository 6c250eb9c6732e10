"""One image loader for the API, the CLI, training and the app.

Whatever comes in (a path, raw bytes, a PIL image or a numpy array) leaves as an upright 8-bit RGB
``PIL.Image``, or raises :class:`ImageError` with a one-line reason naming the input.

Conversions, documented for users:
- EXIF orientation is applied, so phone photos are encoded upright.
- Transparency (RGBA, LA, palette with transparency) is flattened onto a white background.
- 16-bit and 32-bit greyscale are rescaled to 8 bits by their full range (floating-point ones must be
  finite); CMYK, YCbCr, greyscale and palette images are converted to RGB. Animated images (GIF,
  WebP, AVIF, HEIF sequences) use their first frame.
- Phones' HEIC/HEIF photos are decoded by libheif (pillow-heif's Pillow plugin, registered when this module is
  imported), which turns them upright itself and resets their EXIF orientation; AVIF is Pillow's own. Both go
  through the same checks as any other format.
- Given ``min_side`` (the encoder's resize), a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale when its short
  side still holds twice ``min_side`` pixels that way (Pillow's ``draft``): a phone photo decodes several times
  faster, and the preprocessing still downsamples (antialiased) from at least twice its size, as from the full
  photo. Smaller photos (COCO's, Flickr8k's) and other formats decode in full.
- Images above ``MAX_IMAGE_PIXELS`` are refused from their header, before any pixel is decoded
  (decompression-bomb guard; a HEIF also by the size it stores: tiles, or a crop's whole); very thin images are
  bounded later, by the encoder's aspect-ratio crop.
- Float arrays must hold values in [0, 1]; integer arrays are scaled by their type's full range.
- Unreadable files (missing, no permission, a name too long, corrupt) raise :class:`ImageError`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

# HEIF/HEIC, what phones (iPhones' default) save photos as: Pillow opens them once this plugin is registered, in
# every process that imports this module (the API, the CLI, bulk loader workers, the server's decode workers and
# Gradio's own conversions). Once, here: the import costs milliseconds and no package import loads this module.
pillow_heif.register_heif_opener()

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

MAX_IMAGE_PIXELS = 50_000_000
"""Largest accepted width x height (about 8660 x 5773): larger headers are refused unread."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".hif",
                    ".avif")
BACKGROUND = (255, 255, 255)
DRAFTED_FORMATS = ("JPEG", "MPO")  # what libjpeg decodes at a reduced scale
DRAFT_MARGIN = 2  # the drafted short side holds this many times min_side (chosen in benchmarks/README.md)


def describe(source: ImageInput) -> str:
    """A short name for an image input, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageInput, formats: tuple[str, ...] | None = None,
               min_side: int | None = None) -> Image.Image:
    """Return ``source`` as an upright RGB image, or raise :class:`ImageError`; a file or bytes only of one of
    Pillow's ``formats`` when given (a server refuses what a photo never is, by name, before decoding it). With
    ``min_side``, a large JPEG may come back smaller, its short side at least twice ``min_side`` (see the module's
    docstring)."""
    name = describe(source)
    if isinstance(source, Image.Image):
        return _to_rgb(source, name)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError(f"{name}: empty input (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), name, formats, min_side)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(_image_file(source, name), "rb") as handle:
                return _decode(handle, name, formats, min_side)
        except OSError as exc:  # permissions, a name too long, an I/O error: the reason, not a traceback
            raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
    raise ImageError(f"{name}: unsupported image input; give a path, bytes, a PIL image or a numpy array")


def _image_file(source: str | os.PathLike, name: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{name}: file not found")
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return path


def _decode(stream, name: str, formats: tuple[str, ...] | None = None, min_side: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unrecognised file format)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image dimensions are above the limit of {MAX_IMAGE_PIXELS:,} pixels "
                         "(possible decompression bomb)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's plugins raise all of these
        raise ImageError(f"{name}: truncated or corrupt image data ({_one_line(exc)})") from None
    with image:
        if formats is not None and image.format not in formats:
            raise ImageError(f"{name}: {image.format} images are not accepted here (only {', '.join(formats)})")
        _check_size(image.width, image.height, name)
        _check_stored_size(image, name)
        try:
            image.seek(0)  # first frame of an animation
            if min_side is not None and image.format in DRAFTED_FORMATS:
                # libjpeg's scale s is the largest of 8, 4, 2, 1 with s <= short side // wanted, so the drafted
                # short side is still >= wanted; the orientation turns after, which keeps the short side short.
                wanted = min_side * DRAFT_MARGIN
                image.draft(None, (wanted, wanted))
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{name}: truncated or corrupt image data ({_one_line(exc)})") from None
        return _to_rgb(image, name)


def _one_line(exc: BaseException) -> str:
    """A decoder's reason on one line: libheif's end with a newline."""
    return " ".join(str(exc).split())


def _check_size(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: image is {width}x{height} pixels, above the limit of {MAX_IMAGE_PIXELS:,} pixels "
            "(possible decompression bomb)"
        )


def _check_stored_size(image: Image.Image, name: str) -> None:
    """A HEIF shows its header's size after a crop (``clap``) of what it stores, and may store it as a grid of tiles
    larger than that: the pixel bound holds for what libheif would decode, which the shown size could hide."""
    if image.format != "HEIF":
        return
    stored = [image.size]
    if tiling := image.info.get("tiling"):
        stored.append((tiling["num_columns"] * tiling["tile_width"], tiling["num_rows"] * tiling["tile_height"]))
    heif = getattr(image, "_heif_file", None)  # pillow-heif's own objects: the crop's size is not public
    frame = heif[image.tell()] if heif is not None else None
    for transform in getattr(getattr(frame, "_c_image", None), "transformations", ()):
        if transform[0] == "clap":  # ("clap", left, top, right, bottom, stored width, stored height)
            stored.append((transform[5], transform[6]))
    width, height = max(stored, key=lambda size: size[0] * size[1])
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image is stored as {width}x{height} pixels (tiles or a crop around its "
                         f"{image.width}x{image.height}), above the limit of {MAX_IMAGE_PIXELS:,} pixels "
                         "(possible decompression bomb)")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    _check_size(image.width, image.height, name)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good photo
        pass
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _rescale_to_8bit(np.asarray(image, dtype=np.float64), name)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def _rescale_to_8bit(values: np.ndarray, name: str) -> Image.Image:
    """Greyscale stretched over 0-255; NaN or infinity (a float TIFF's) would make the whole image black."""
    if not np.isfinite(values).all():
        raise ImageError(f"{name}: image contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(((values - low) * scale).round().astype(np.uint8))


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 array")
    _check_size(array.shape[1], array.shape[0], name)
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: array contains NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ImageError(f"{name}: float pixel values must be in [0, 1], found {float(array.min()):g} to "
                             f"{float(array.max()):g}; divide 0-255 values by 255 or pass a uint8 array")
        pixels = (array * 255.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        high = 1 if array.dtype == np.bool_ else np.iinfo(array.dtype).max
        pixels = (array.astype(np.float64) / high * 255.0).round().astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported array dtype {array.dtype}")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(pixels)), name)
