"""Caption quality of the round-2 variants: ensembles, test-time mirror views, consensus reranking.

    python benchmarks/quality_variants.py --members assets/model runs/seed1/best runs/seed2/best \\
        --images ../shared/data/flickr8k/images --captions ../shared/data/flickr8k/captions_val.json \\
        [--train-captions ../shared/data/flickr8k/captions_train.json] [--feature-cache DIR]

Each photo goes through the CNN once per view (centre crop and its mirror, cached on disk like
training's features); every variant then decodes those features with the first member's default
decoding and is scored with the coco-caption BLEU-4 and CIDEr-D. Rows:

- each member alone, then ensembles of the first 2, 3, ... members (``Captioner.ensemble``);
- the same with each photo's feature averaged over the centre crop and its mirror;
- consensus (minimum-Bayes-risk) reranking of a beam-``--nbest`` list, the single first member: each
  candidate scored by its similarity to the others, weighted by their probability, with n-gram F1
  or (with ``--train-captions``) CIDEr-D whose document frequencies come from the training captions.

Choose on val (never on test); ``../shared/data/coco-dev`` measures everyday photos outside Flickr8k.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from captioner import Captioner
from captioner.data.annotations import load_captions
from captioner.generation.search import Caption
from captioner.train.features import FeatureCache
from captioner.runtime import cache_dir
from captioner.metrics import CiderD, score_captions
from captioner.data.vocab import tokenize

Similarity = Callable[[Sequence[str], Sequence[str]], float]


def ngram_f1(a: Sequence[str], b: Sequence[str]) -> float:
    """Mean over n = 1..4 of the F1 of clipped n-gram matches between two token lists."""
    total = 0.0
    for n in range(1, 5):
        grams_a = Counter(tuple(a[i:i + n]) for i in range(len(a) - n + 1))
        grams_b = Counter(tuple(b[i:i + n]) for i in range(len(b) - n + 1))
        overlap = sum((grams_a & grams_b).values())
        if overlap:
            precision, recall = overlap / sum(grams_a.values()), overlap / sum(grams_b.values())
            total += 2 * precision * recall / (precision + recall)
    return total / 4


def consensus_pick(candidates: list[Caption], similarity: Similarity) -> str:
    """The candidate with the highest expected similarity to the others under the model's probabilities."""
    weights = torch.tensor([c.log_prob for c in candidates]).softmax(0).tolist()
    def expected(i: int) -> float:
        return sum(w * similarity(candidates[i].tokens, c.tokens) for j, (w, c) in enumerate(zip(weights, candidates))
                   if j != i)
    return candidates[max(range(len(candidates)), key=expected)].text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", nargs="+", required=True, help="checkpoint directories (same encoder and vocabulary)")
    parser.add_argument("--images", required=True)
    parser.add_argument("--captions", required=True, help="COCO-format split to score (val to choose)")
    parser.add_argument("--train-captions", help="training captions: document frequencies for CIDEr-D consensus")
    parser.add_argument("--nbest", type=int, default=5, help="candidates reranked by consensus (default: 5)")
    parser.add_argument("--feature-cache", default=str(cache_dir("features")))
    args = parser.parse_args()

    members = [Captioner.from_pretrained(path, device="cpu", engine="torch") for path in args.members]
    records, _ = load_captions(args.captions, args.images)
    references = {i: r.captions for i, r in enumerate(records)}
    paths = [r.path for r in records]
    views = {view: FeatureCache(args.feature_cache, members[0].encoder, view).get(paths).features
             for view in ("center", "flip")}
    features = {"centre crop": views["center"], "centre + mirror": (views["center"] + views["flip"]) / 2}

    def row(name: str, predictions: list[str], seconds: float) -> None:
        scores = score_captions(dict(enumerate(predictions)), references, ["BLEU", "CIDEr-D"])
        print(f"| {name} | {scores['BLEU-4']:.4f} | {scores['CIDEr-D']:.4f} | {scores['distinct_captions']:.0%} | "
              f"{seconds:.1f} |", flush=True)

    print(f"{len(records)} photos of {args.captions}\n\n| variant | BLEU-4 | CIDEr-D | distinct | decode s |\n|---|---|---|---|---|")
    for view, rows in features.items():
        models = [(f"member {i + 1} alone", m) for i, m in enumerate(members)]
        models += [(f"ensemble of {k}", Captioner.ensemble(members[:k])) for k in range(2, len(members) + 1)]
        for name, model in models:
            started = time.perf_counter()
            predictions = model.caption(rows)
            row(f"{name}, {view}", predictions, time.perf_counter() - started)

    similarities: dict[str, Similarity] = {"n-gram F1": ngram_f1}
    if args.train_captions:
        train, _ = load_captions(args.train_captions, args.images)
        cider = CiderD([[tokenize(c) for c in r.captions] for r in train])
        similarities["CIDEr-D"] = lambda a, b: cider.score(a, [b])
    started = time.perf_counter()
    nbest = members[0].generate(features["centre crop"], beam_size=args.nbest, num_return_sequences=args.nbest)
    seconds = time.perf_counter() - started
    row(f"member 1, beam {args.nbest}, top of the list", [c[0].text for c in nbest], seconds)
    for name, similarity in similarities.items():
        started = time.perf_counter()
        picks = [consensus_pick(candidates, similarity) for candidates in nbest]
        row(f"member 1, beam {args.nbest}, consensus by {name}", picks, seconds + time.perf_counter() - started)


if __name__ == "__main__":
    main()
