"""Throughput of the two stages that scale: feature extraction (images/s) and decoder training (captions/s).

    python benchmarks/scale_throughput.py --device cuda [--images 4096] [--encoders resnet50,mobilenet_v2]
        [--batch-sizes 128,512] [--workers 8] [--compile]

Feature extraction runs the project's own ``extract_features`` (JPEG decoding and preprocessing in
``--workers`` loader processes, the CNN in fp32, channels-last on CUDA) over synthetic 500x375 JPEG
photos. Decoder training runs the same step as ``train.py`` (teacher forcing, loss over real tokens
only, gradient clipping, Adam) from cached features, with a COCO-sized vocabulary and caption
lengths, in fp32 and under bf16 autocast. Encoder weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captioner.models.decoder import Decoder, DecoderConfig
from captioner.models.encoder import Encoder
from captioner.train.features import extract_features
from captioner.data.vocab import PAD_ID

VOCAB_SIZE = 10_000  # Karpathy's COCO vocabulary with a frequency threshold of 5 has ~9,500 words


def write_photo(path: Path) -> None:
    """A smooth random 500x375 picture: compresses and decodes like a photo, unlike pure noise."""
    rng = np.random.default_rng(int(path.stem))
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    small.resize((500, 375), Image.BICUBIC).save(path, quality=90)


def photos(folder: Path, count: int) -> list[Path]:
    paths = [folder / f"{i:06d}.jpg" for i in range(count)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_photo, paths, chunksize=64))
    return paths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extraction_rate(name: str, paths: list[Path], device: torch.device, batch_size: int, workers: int) -> float:
    encoder = Encoder.pretrained(name, "none")
    extract_features(encoder, paths[: 2 * batch_size], batch_size, workers, device, progress=False)  # warm-up
    started = time.perf_counter()
    extract_features(encoder, paths, batch_size, workers, device, progress=False)
    return len(paths) / (time.perf_counter() - started)


def decoder_training_rate(device: torch.device, batch_size: int, precision: str, compile_model: bool,
                          steps: int = 50) -> float:
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(2048, VOCAB_SIZE, 512, 512)).to(device).train()
    model = torch.compile(decoder) if compile_model else decoder
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4)
    features = torch.randn(batch_size, 2048, device=device)

    def batch():
        lengths = torch.randint(10, 18, (batch_size,))  # <start> + words + <end>: COCO captions average ~11 words
        tokens = torch.randint(4, VOCAB_SIZE, (batch_size, int(lengths.max())))
        tokens[torch.arange(tokens.size(1)) >= lengths[:, None]] = PAD_ID
        return tokens.to(device), lengths

    def step(tokens, lengths):
        targets = tokens[:, 1:][tokens[:, 1:] != PAD_ID]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(features, tokens, lengths, valid_only=True)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / len(targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        optimizer.step()

    batches = [batch() for _ in range(steps + 10)]
    for tokens, lengths in batches[:10]:  # warm-up (and compilation)
        step(tokens, lengths)
    synchronize(device)
    started = time.perf_counter()
    for tokens, lengths in batches[10:]:
        step(tokens, lengths)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--encoders", default="resnet50,mobilenet_v2")
    parser.add_argument("--extract-batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="also time the decoder under torch.compile")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as folder:
        paths = photos(Path(folder), args.images)
        for encoder in args.encoders.split(","):
            rate = extraction_rate(encoder, paths, device, args.extract_batch_size, args.workers)
            print(f"feature extraction  {encoder:<13} batch {args.extract_batch_size:4d}, {args.workers} workers: "
                  f"{rate:8.0f} images/s")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for precision in args.precisions.split(","):
            for compiled in (False, True) if args.compile else (False,):
                rate = decoder_training_rate(device, batch_size, precision, compiled, args.steps)
                print(f"decoder training    batch {batch_size:4d}, {precision}{', compiled' if compiled else '':10}: "
                      f"{rate:8.0f} captions/s")


if __name__ == "__main__":
    main()
