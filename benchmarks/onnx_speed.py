"""PyTorch against ONNX Runtime on the CPU, in one run: single-photo latency, batch throughput, evaluate.

    python benchmarks/onnx_speed.py [--model DIR] [--baseline DIR] [--photos 30] [--evaluate]

Prints the load time of each engine (ONNX Runtime's first load exports its graphs into an empty cache, the
next reads them), the median single-photo ``caption()`` time of each engine (the engines alternate photo by
photo, so a busy neighbour slows both alike), ONNX Runtime's encoder forward time alone for scale,
the ONNX encoder's time per image by chunk size, and images/s captioning 64 photos in one call.
``--baseline`` times another checkpoint's ONNX Runtime ``caption()`` in the same loop (e.g. the previous
bundled model, to compare a larger model's latency). ``--evaluate`` also runs ``captioner evaluate`` on the Flickr8k test split once per engine (a few
minutes each) and prints wall times and scores. Uses the bundled model (or ``--model``) and photos from
../shared/data when present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from captioner import Captioner
from captioner.cli import main as cli
from captioner.data.images import load_image
from captioner.models.captioner import BUNDLED_MODEL
from captioner.runtime import ENGINE_NAMES
from decode_speed import photos, timed  # (which also puts tests/ on sys.path, for conftest)


def evaluate(model_dir: Path, engine: str, data: Path) -> tuple[float, dict]:
    """Wall time and metrics of ``captioner evaluate`` on the Flickr8k test split, as a user runs it."""
    out = Path(tempfile.mkdtemp()) / "metrics.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "captioner", "evaluate", "--images", str(data / "images"),
                    "--captions", str(data / "captions_test.json"), "--model", str(model_dir), "--engine", engine,
                    "--out", str(out), "-q"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--photos", type=int, default=30, help="photos timed one by one (default: 30)")
    parser.add_argument("--baseline", help="another checkpoint whose ONNX Runtime caption() is timed alongside")
    parser.add_argument("--evaluate", action="store_true", help="also time `captioner evaluate` on Flickr8k test")
    args = parser.parse_args()

    model_dir = Path(args.model or BUNDLED_MODEL)
    with tempfile.TemporaryDirectory() as cache:  # an empty graph cache: the first load exports, the next reads
        os.environ["CAPTIONER_CACHE_DIR"] = cache
        loads = {}
        for load in ("torch", "onnx, first (export)", "onnx, cached"):
            started = time.perf_counter()
            Captioner.from_pretrained(model_dir, device="cpu", engine=load.split(",")[0])
            loads[load] = time.perf_counter() - started
        print("from_pretrained(): " + ", ".join(f"{load} {seconds:.2f} s" for load, seconds in loads.items()))
    engines = {engine: Captioner.from_pretrained(model_dir, device="cpu", engine=engine) for engine in ("torch", "onnx")}
    paths = photos(64)
    print(f"model: {model_dir}, {torch.get_num_threads()} threads, decoding {engines['torch'].generation_config}")

    timed_models = dict(engines)
    if args.baseline:
        timed_models["baseline"] = Captioner.from_pretrained(Path(args.baseline), device="cpu", engine="onnx")
    times: dict[str, list[float]] = {engine: [] for engine in timed_models}
    for model in timed_models.values():
        model.caption(paths[0])  # warm-up
    for path in paths[:args.photos]:
        for engine, model in timed_models.items():
            started = time.perf_counter()
            model.caption(path)
            times[engine].append(time.perf_counter() - started)
    single = {engine: statistics.median(values) for engine, values in times.items()}
    pixels = torch.stack([engines["torch"].encoder.preprocess(load_image(paths[0]))])
    onnx_encoder = engines["onnx"].onnx_runtime.encoder
    encoder_alone = timed(lambda: onnx_encoder(pixels), repeats=20)
    for engine, seconds in single.items():
        name = ENGINE_NAMES.get(engine, f"baseline {args.baseline}, ONNX Runtime")
        print(f"single-photo caption(), {name:<12}: {seconds * 1000:6.1f} ms (median of {args.photos})")
    if args.baseline:
        print(f"ONNX Runtime caption() time / the baseline's: {single['onnx'] / single['baseline']:.2f}")
    print(f"speed-up {single['torch'] / single['onnx']:.1f}x; ONNX encoder forward alone {encoder_alone * 1000:.1f} ms, "
          f"caption() / encoder = {single['onnx'] / encoder_alone:.1f}")

    images = [load_image(p) for p in paths[:32]]
    batch = torch.stack([engines["torch"].encoder.preprocess(image) for image in images])
    sizes = ", ".join(f"chunk {chunk}: {timed(lambda: [onnx_encoder(batch[i:i + chunk]) for i in range(0, 32, chunk)]) / 32 * 1000:.1f}"
                      for chunk in (1, 4, 8, 32))
    print(f"ONNX encoder ms/image by chunk size: {sizes}")
    for engine, model in engines.items():
        seconds = timed(lambda: model.caption(paths), repeats=1)
        print(f"64 photos in one caption() call, {ENGINE_NAMES[engine]:<12}: {len(paths) / seconds:6.1f} images/s")

    if args.evaluate:
        from conftest import find_shared_data

        shared = find_shared_data()
        if shared is None:
            sys.exit("--evaluate needs ../shared/data/flickr8k")
        results = {engine: evaluate(model_dir, engine, shared / "flickr8k") for engine in engines}
        for engine, (seconds, metrics) in results.items():
            scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "seconds")
            print(f"captioner evaluate, {ENGINE_NAMES[engine]:<12}: {seconds:6.1f} s wall ({metrics['seconds']} s "
                  f"captioning {metrics['images']} photos); {scores}")
        same = all(round(v, 3) == round(results["onnx"][1][k], 3) for k, v in results["torch"][1].items()
                   if isinstance(v, float) and k != "seconds")
        print(f"scores equal to 3 decimals: {same}")


if __name__ == "__main__":
    main()
