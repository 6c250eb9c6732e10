"""Bulk captioning photos/s: the pipeline of ``captioner caption --out`` against the sequential loop it replaced.

    python benchmarks/bulk_caption.py [--flickr 1000] [--coco 300] [--workers 0 2] [--batch-size 32] [--rounds 1]

For 1,000 Flickr8k photos (224 x 224) and for the 80 full-size COCO photos of ../shared/data/coco-sample
repeated to about 300, in one run: today's path (before bulk captioning: each image loaded in the main
process, then one encode and decode per batch, as ``captioner caption`` did) and the bulk pipeline
(:func:`captioner.bulk.captioning.caption_files` writing JSONL, labels included, its model loaded as ``captioner caption``
loads it: ONNX Runtime on half the cores per stage) at each ``--workers`` count.
Files are read once beforehand so every path finds them in the page cache. With ``--rounds N`` the paths
take turns N times and each keeps its best round, so a busy neighbour slows them alike. Checks that every
path gives the same captions, and prints a table with the CPU time each photo took (this process and its
loader workers; two cores' worth per wall second at most) and the extrapolated time for a million photos.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from captioner import Captioner  # noqa: E402
from captioner.bulk.jsonl import JsonlFile
from captioner.bulk.captioning import caption_files  # noqa: E402
from captioner.runtime import BUNDLED_MODEL, stage_threads  # noqa: E402
from conftest import find_shared_data  # noqa: E402


def todays_path(model: Captioner, files: list[str], batch_size: int) -> list[list[str]]:
    """The captioning loop of ``captioner caption`` before bulk captioning (commit 04d962e), minus printing."""
    config, texts = model.generation_config, []
    for start in range(0, len(files), batch_size):
        pixels = torch.stack([model.encoder.pixels(path) for path in files[start:start + batch_size]])
        texts += [[c.text for c in captions] for captions in model.generate(model.encode_pixels(pixels), config)]
    return texts


def bulk_path(model: Captioner, files: list[str], batch_size: int, workers: int) -> list[list[str]]:
    """``captioner caption --out`` as a user runs it, into a fresh JSONL file; the captions read back."""
    with tempfile.TemporaryDirectory() as folder:
        writer = JsonlFile(Path(folder) / "captions.jsonl")
        try:
            caption_files(model, files, writer, model.generation_config, batch_size, workers)
        finally:
            writer.close()
        records = [json.loads(line) for line in writer.path.read_bytes().splitlines()]
    return [[c["text"] for c in record["captions"]] for record in records]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader workers, joined after each run)."""
    return sum(usage.ru_utime + usage.ru_stime for usage in (resource.getrusage(resource.RUSAGE_SELF),
                                                             resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--flickr", type=int, default=1000, help="Flickr8k photos (default: 1000)")
    parser.add_argument("--coco", type=int, default=300, help="full-size COCO photos, repeated (default: 300)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="--num-workers values (default: 0 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32, the CLI's)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--rounds", type=int, default=1, help="turns of every path, best kept (default: 1)")
    args = parser.parse_args()

    shared = find_shared_data()
    if shared is None:
        sys.exit("needs ../shared/data (Flickr8k and coco-sample)")
    coco = sorted(str(p) for p in (shared / "coco-sample" / "images").glob("*.jpg"))
    sets = {"Flickr8k 224x224": sorted(str(p) for p in (shared / "flickr8k" / "images").glob("*.jpg"))[:args.flickr],
            "COCO full-size": (coco * (-(-args.coco // len(coco))))[:args.coco]}
    for files in sets.values():
        for file in set(files):
            Path(file).read_bytes()  # into the page cache, for every path alike
    model = Captioner.from_pretrained(args.model or BUNDLED_MODEL, device=args.device)
    bulk_model = Captioner.from_pretrained(args.model or BUNDLED_MODEL, device=args.device, num_threads=stage_threads())
    print(f"engine {model.engine}, device {model.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"decoding {model.generation_config}")
    todays_path(model, sets["COCO full-size"][:args.batch_size], args.batch_size)  # warm-up

    print("| photos | path | photos/s | vs today | CPU ms/photo | 1M photos | same captions |")
    print("|---|---|---|---|---|---|---|")
    for name, files in sets.items():
        paths = {"today's sequential loop": lambda: todays_path(model, files, args.batch_size)}
        paths.update({f"bulk, --num-workers {w}": (lambda w=w: bulk_path(bulk_model, files, args.batch_size, w))
                      for w in args.workers})
        rates: dict[str, float] = {}
        cpu: dict[str, float] = {}
        captions: dict[str, list[list[str]]] = {}
        for _ in range(args.rounds):
            for label, run in paths.items():
                started, cpu_before = time.perf_counter(), cpu_seconds()
                captions[label] = run()
                rate = len(files) / (time.perf_counter() - started)
                if rate > rates.get(label, 0.0):
                    rates[label], cpu[label] = rate, (cpu_seconds() - cpu_before) / len(files)
        today, expected = rates["today's sequential loop"], captions["today's sequential loop"]
        for label, rate in rates.items():
            same = "-" if captions[label] is expected else "yes" if captions[label] == expected else "NO"
            print(f"| {len(files)} {name} | {label} | {rate:.1f} | {rate / today:.2f}x | {cpu[label] * 1000:.1f} | "
                  f"{1e6 / rate / 3600:.1f} h | "
                  f"{same} |", flush=True)

if __name__ == "__main__":
    main()
