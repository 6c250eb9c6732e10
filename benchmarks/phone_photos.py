"""Phone-size photos: ``caption()`` of a 12-megapixel JPEG against the same photo at 640x480, and what the drafted
JPEG decode (libjpeg at a reduced scale, ``captioner.data.images``) changes in the captions.

    python benchmarks/phone_photos.py [--photos 60] [--images DIR] [--margins 1,2,4]

Makes the phone photos from COCO photos (coco-dev in ../shared/data by default) by upscaling each to 4032 px on
its long side (bicubic, JPEG quality 92), in memory. Prints the median ``caption()`` time of a phone photo decoded whole, drafted, and of
its 640x480 copy (alternating, ONNX Runtime engine, bundled model), then, for each drafting margin (the drafted
short side holds at least margin x the encoder's resize), how many captions equal those of the photo decoded
whole, and the phone photo's time at that margin.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

from PIL import Image

import captioner.data.images as images
from captioner import Captioner

DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-dev" / "images"


def jpeg(image: Image.Image, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def median_ms(model: Captioner, data: bytes, rounds: int = 9) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        model.caption(data)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--margins", default="1,2,4")
    args = parser.parse_args()
    model = Captioner.from_pretrained()
    phones, smalls = [], []
    for path in sorted(args.images.glob("*.jpg"))[:args.photos]:
        image = Image.open(path).convert("RGB")
        scale = 4032 / max(image.size)
        phones.append(jpeg(image, (round(image.width * scale), round(image.height * scale))))
        smalls.append(jpeg(image, (640, 480) if image.width >= image.height else (480, 640)))
    model.caption(phones[0])  # the first call loads the sessions
    kept, images.DRAFT_MARGIN = images.DRAFT_MARGIN, 10**6  # no scale of libjpeg holds that: decoded whole
    whole_ms = statistics.median(median_ms(model, data, 3) for data in phones[:5])
    images.DRAFT_MARGIN = kept
    print(f"caption(), {model.engine}: 4032 px JPEG decoded whole {whole_ms:.0f} ms")
    phone_ms = statistics.median(median_ms(model, data, 3) for data in phones[:5])
    small_ms = statistics.median(median_ms(model, data, 3) for data in smalls[:5])
    print(f"caption(), {model.engine}: 4032 px JPEG drafted (margin {kept}) {phone_ms:.0f} ms, 640x480 JPEG {small_ms:.0f} ms "
          f"({phone_ms / small_ms:.2f}x)")
    whole = [model.caption(Image.open(io.BytesIO(data))) for data in phones]  # a PIL image is never drafted
    for margin in map(int, args.margins.split(",")):
        images.DRAFT_MARGIN = margin
        drafted = [model.caption(data) for data in phones]
        same = sum(a == b for a, b in zip(whole, drafted))
        print(f"margin {margin}: {same} of {len(phones)} captions as decoded whole, "
              f"4032 px JPEG {statistics.median(median_ms(model, data, 3) for data in phones[:5]):.0f} ms")


if __name__ == "__main__":
    main()
