"""Training throughput: decoder steps from cached features vs re-running the CNN for every batch.

The common tutorials load, preprocess and encode the images of every batch, every epoch. captioner
encodes each image once (captioner/train/features.py) and trains the decoder from the cache. Both loops below do the
same decoder work on the same captions with the same batch size; only the source of the features
differs. Prints captions/second for both and the ratio.

    python benchmarks/train_throughput.py [--encoder mobilenet_v2] [--batches 20] [--batch-size 64]

Uses ../shared/data/flickr8k when present, else synthetic images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from captioner.data.annotations import encode_captions, load_captions  # noqa: E402
from captioner.models.decoder import Decoder, DecoderConfig  # noqa: E402
from captioner.models.encoder import Encoder  # noqa: E402
from captioner.train.features import extract_features  # noqa: E402
from captioner.data.images import load_image  # noqa: E402
from captioner.data.vocab import PAD_ID, Vocabulary  # noqa: E402


def dataset(limit_images: int):
    from conftest import find_shared_data

    shared = find_shared_data()
    if shared is not None:
        folder = shared / "flickr8k"
        records, _ = load_captions(folder / "captions_val.json", folder / "images")
        return records[:limit_images], "Flickr8k val"
    from synthetic import make_split

    folder = Path(tempfile.mkdtemp())
    make_split(folder, "bench", limit_images, seed=0)
    records, _ = load_captions(folder / "bench.json", folder / "images")
    return records, "synthetic"


def train_steps(decoder, optimizer, captions, batches, features_for) -> float:
    """Run ``batches`` teacher-forced steps; return captions per second."""
    started, done = time.perf_counter(), 0
    for rows in batches:
        tokens, lengths = captions.tokens[rows], captions.lengths[rows]
        tokens = tokens[:, : int(lengths.max())]
        logits = decoder(features_for(captions.image_index[rows]), tokens, lengths)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        optimizer.step()
        done += len(rows)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="mobilenet_v2")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    records, source = dataset(limit_images=args.batches * args.batch_size // 5 + 1)
    vocab = Vocabulary.build((c for r in records for c in r.captions), min_count=1)
    captions = encode_captions(records, vocab, max_length=30)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(captions), generator=generator)
    batches = [order[i:i + args.batch_size] for i in range(0, args.batches * args.batch_size, args.batch_size)]
    encoder = Encoder.pretrained(args.encoder).eval()
    paths = [r.path for r in records]

    def fresh_decoder():
        torch.manual_seed(0)
        decoder = Decoder(DecoderConfig(encoder.config.feature_size, len(vocab)))
        return decoder.train(), torch.optim.Adam(decoder.parameters(), lr=4e-4)

    started = time.perf_counter()
    cached = extract_features(encoder, paths, progress=False)
    encode_seconds = time.perf_counter() - started

    decoder, optimizer = fresh_decoder()
    cached_rate = train_steps(decoder, optimizer, captions, batches, lambda rows: cached[rows])

    @torch.no_grad()
    def encode_batch(rows):
        pixels = torch.stack([encoder.preprocess(load_image(paths[i])) for i in rows.tolist()])
        return encoder(pixels)

    decoder, optimizer = fresh_decoder()
    per_batch_rate = train_steps(decoder, optimizer, captions, batches, encode_batch)

    print(f"data: {source}, {len(records)} images, {args.batches} batches of {args.batch_size} captions, "
          f"encoder {args.encoder}, {torch.get_num_threads()} CPU threads")
    print(f"one-off feature extraction: {len(paths) / encode_seconds:.1f} images/s ({encode_seconds:.1f} s)")
    print(f"cached features:            {cached_rate:8.1f} captions/s")
    print(f"CNN every batch (tutorial): {per_batch_rate:8.1f} captions/s")
    print(f"speed-up:                   {cached_rate / per_batch_rate:8.1f}x")


if __name__ == "__main__":
    main()
