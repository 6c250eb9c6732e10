"""Inference speed: batched vs one-image-at-a-time beam search, and where single-image latency goes.

    python benchmarks/decode_speed.py [--model DIR] [--beam-size 5]

Prints images/second for beam search over 32 and 256 images decoded as one batch and one at a time
(decoder only, from precomputed features), the encoder's time per image at several chunk sizes, and
a single image's latency split into preprocessing, encoder and decoder. Uses the bundled model (or
``--model``) and photos from ../shared/data when present, else synthetic images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from captioner import Captioner  # noqa: E402
from captioner.data.images import load_image  # noqa: E402


def photos(count: int) -> list[Path]:
    from conftest import find_shared_data

    shared = find_shared_data()
    if shared is not None:
        return sorted((shared / "flickr8k" / "images").glob("*.jpg"))[:count]
    from synthetic import make_split

    folder = Path(tempfile.mkdtemp())
    make_split(folder, "bench", count, seed=0)
    return sorted((folder / "images").glob("*.png"))


def timed(function, repeats: int = 3) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs, after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--beam-size", type=int, default=5)
    args = parser.parse_args()

    model = Captioner.from_pretrained(args.model, device="cpu")
    paths = photos(256)
    features = model.encode(paths)
    print(f"model: {model.encoder.config.name} encoder, vocabulary {len(model.vocab)}, "
          f"{torch.get_num_threads()} CPU threads, beam {args.beam_size}")

    for count in (32, 256):
        subset = features[:count]
        batched = timed(lambda: model.generate(subset, beam_size=args.beam_size, batch_size=count), repeats=1)
        single = timed(lambda: [model.generate(subset[i:i + 1], beam_size=args.beam_size) for i in range(count)],
                       repeats=1)
        print(f"{count:4d} images: batched {count / batched:7.1f} images/s | one at a time {count / single:6.1f} "
              f"images/s | speed-up {single / batched:4.1f}x")

    images = [load_image(p) for p in paths[:32]]
    pixels = torch.stack([model.encoder.preprocess(image) for image in images])
    print("encoder time per image by chunk size:")
    with torch.inference_mode():
        for chunk in (1, 4, 8, 16, 32):
            seconds = timed(lambda: [model.encoder(pixels[i:i + chunk]) for i in range(0, 32, chunk)])
            print(f"  chunk {chunk:2d}: {seconds / 32 * 1000:6.1f} ms/image")

    path = paths[0]
    with torch.inference_mode():
        load = timed(lambda: model.encoder.preprocess(load_image(path)), repeats=10)
        single_pixels = model.encoder.preprocess(load_image(path))[None]
        encode = timed(lambda: model.encoder(single_pixels), repeats=10)
        feature = model.encoder(single_pixels)
    decode = timed(lambda: model.generate(feature, beam_size=args.beam_size), repeats=10)
    total = timed(lambda: model.caption(path, beam_size=args.beam_size), repeats=10)
    print(f"single image ({path.name}): load+preprocess {load * 1000:.1f} ms, encoder {encode * 1000:.1f} ms, "
          f"beam-{args.beam_size} decoder {decode * 1000:.1f} ms; caption() end to end {total * 1000:.1f} ms")


if __name__ == "__main__":
    main()
