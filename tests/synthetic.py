"""A tiny synthetic COCO-style dataset: one coloured shape per image, captions derived from it.

Learning it end to end (colour and shape words from pixels) proves that the whole pipeline works:
data loading, feature extraction, teacher-forced training, decoding.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (240, 220, 20)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {colour} {shape}", "a {colour} {shape} on a white background", "there is a {colour} {shape}",
             "a picture of a {colour} {shape}", "one {colour} {shape} in the middle")


def draw(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    radius = rng.randint(size // 5, size // 3)
    cx, cy = (rng.randint(size // 2 - 6, size // 2 + 6) for _ in range(2))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def make_split(folder: Path, name: str, count: int, seed: int, start_id: int = 0) -> Path:
    """Write ``count`` images into ``folder/images`` and ``folder/<name>.json`` (COCO captions)."""
    rng = random.Random(seed)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), SHAPES[i % len(SHAPES)]
        image_id = start_id + i
        file_name = f"{name}_{image_id:05d}.png"
        draw(colour, shape, rng).save(images_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "colour": colour, "shape": shape})
        for template in rng.sample(TEMPLATES, 3):
            annotations.append({"id": len(annotations) + start_id * 10, "image_id": image_id,
                                "caption": template.format(colour=colour, shape=shape)})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file claiming ``width`` x ``height`` pixels: a decompression bomb for tests."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
