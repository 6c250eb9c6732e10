"""Caption quality across decoding settings: one encoder pass, then each setting decoded and scored.

    python benchmarks/decoding_sweep.py --model DIR --images DIR --captions SPLIT.json \\
        [--beam-sizes 1,3,5] [--length-penalties 0,0.5,1] [--metrics BLEU,ROUGE-L,CIDEr-D]

Used to choose the bundled model's default decoding on the validation split (never on test).
Prints one row per setting: BLEU-4, CIDEr-D (and the other metrics asked for), mean caption
length and the share of distinct captions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from captioner import Captioner
from captioner.data.annotations import load_captions
from captioner.metrics import score_captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--images", required=True)
    parser.add_argument("--captions", required=True)
    parser.add_argument("--split", default="val", help="split of a Karpathy file (default: val)")
    parser.add_argument("--beam-sizes", default="1,3,5")
    parser.add_argument("--length-penalties", default="0")
    parser.add_argument("--metrics", default="BLEU,ROUGE-L,CIDEr-D")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    model = Captioner.from_pretrained(args.model)
    records, _ = load_captions(args.captions, args.images, args.split)
    features = model.encode([r.path for r in records])
    references = {i: r.captions for i, r in enumerate(records)}
    rows = []
    for beam, penalty in itertools.product([int(b) for b in args.beam_sizes.split(",")],
                                           [float(p) for p in args.length_penalties.split(",")]):
        strategy = "greedy" if beam == 1 else "beam"
        started = time.perf_counter()
        captions = model.generate(features, strategy=strategy, beam_size=beam, length_penalty=penalty, batch_size=256)
        seconds = time.perf_counter() - started
        predictions = {i: c[0].text for i, c in enumerate(captions)}
        scores = score_captions(predictions, references, args.metrics.split(","))
        words = sum(len(c[0].tokens) for c in captions) / len(captions)
        rows.append({"strategy": strategy, "beam_size": beam, "length_penalty": penalty, **scores,
                     "mean_words": round(words, 2), "decode_seconds": round(seconds, 1)})
        print(f"{strategy:6s} beam {beam:2d} length_penalty {penalty:4.2f} | BLEU-4 {scores['BLEU-4']:.4f} "
              f"CIDEr-D {scores['CIDEr-D']:.4f}" + (f" METEOR {scores['METEOR']:.4f}" if "METEOR" in scores else "")
              + f" | {words:.1f} words, {scores['distinct_captions']:.1%} distinct, {seconds:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
