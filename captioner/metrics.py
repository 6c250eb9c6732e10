"""Caption metrics: the standard coco-caption scorers (pycocoevalcap), plus a fast CIDEr-D for training.

``score_captions`` is what ``captioner evaluate`` reports and what ``train.py`` selects checkpoints
by: PTB tokenization, BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, all on a 0-1 scale except CIDEr-D
(conventionally 0-10, around 0.5-1.0 for good models). The Stanford PTB tokenizer and METEOR need
Java; without it, a Python tokenizer that mimics PTB (lowercase, split punctuation, drop it) is
used, METEOR is skipped, and a warning says so once. SPICE is not offered: its jars download at
run time.

``CiderD`` computes the same CIDEr-D as pycocoevalcap, with document frequencies fixed to a reference
corpus, fast enough to score thousands of sampled captions per batch (the SCST reward).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)  # an image's id in predictions and references

ALL_METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D")
FAST_METRICS = ("BLEU", "ROUGE-L", "CIDEr-D")  # per-epoch validation: no METEOR start-up cost
# The punctuation tokens the coco-caption PTB wrapper removes.
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_FALLBACK_TOKEN = re.compile(r"n't|'\w+|\w+(?:[.-]\w+)*|[^\s\w]")


@lru_cache(maxsize=1)
def java_available() -> bool:
    """Java runs and pycocoevalcap's jars are installed (repackaged copies sometimes strip them)."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    if shutil.which("java") is None or not jar.is_file():
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=1)
def _warn_no_java() -> None:
    """Once per process (the cache remembers the call)."""
    log.warning("Java (or pycocoevalcap's jars) not found: using the Python fallback tokenizer and skipping METEOR; "
                "install Java 8+ for the exact coco-caption scores")


def fallback_tokenize(text: str) -> str:
    """PTB-like tokenization without Java: lowercase, split off punctuation, drop it."""
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    tokens = _FALLBACK_TOKEN.findall(text)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and re.search(r"\w", t))


def tokenize_for_scoring(texts: Mapping[Key, Sequence[str]]) -> dict[Key, list[str]]:
    """Tokenize ``{id: [captions]}`` the coco-caption way (PTB via Java, else the fallback)."""
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({key: [{"caption": c} for c in captions] for key, captions in texts.items()})
    _warn_no_java()
    return {key: [fallback_tokenize(c) for c in captions] for key, captions in texts.items()}


def score_captions(predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]],
                   metrics: Iterable[str] = ALL_METRICS) -> dict[str, float | int]:
    """Corpus scores of one predicted caption per image against its references.

    Returns ``BLEU-1`` .. ``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr-D`` (those requested and
    available) and two diversity figures: ``distinct_captions`` (distinct captions / images) and
    ``vocabulary_used`` (distinct words across all predictions).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(predictions)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} images, e.g. {missing[0]!r}")
    # One tokenizer run for both sides: the Java start-up dominates small evaluations.
    merged = {("ref", i): list(references[k]) for i, k in enumerate(keys)}
    merged.update({("pred", i): [predictions[k]] for i, k in enumerate(keys)})
    tokenized = tokenize_for_scoring(merged)
    gts = {i: tokenized[("ref", i)] for i in range(len(keys))}
    res = {i: [tokenized[("pred", i)][0] or "<empty>"] for i in range(len(keys))}
    wanted = set(metrics)
    scores: dict[str, float] = {}
    if "BLEU" in wanted:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "METEOR" in wanted and java_available():
        scores["METEOR"] = _meteor(gts, res)
    elif "METEOR" in wanted:
        _warn_no_java()
    if "ROUGE-L" in wanted:
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr-D" in wanted:
        scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    texts = [predictions[k] for k in keys]
    scores["distinct_captions"] = len(set(texts)) / max(1, len(texts))
    scores["vocabulary_used"] = len({w for i in range(len(keys)) for w in res[i][0].split()})
    return scores


def _meteor(gts: dict, res: dict) -> float:
    """pycocoevalcap's METEOR, with its Java child always stopped: after an error inside ``compute_score`` its
    lock stays held and its ``__del__`` would wait on it forever, keeping the process (and Java) alive."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        if meteor.lock.locked():
            meteor.lock.release()


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D (sigma 6, clipped counts, x10) with document frequencies from a fixed reference corpus.

    Identical to pycocoevalcap's ``Cider`` when the corpus is the evaluated set itself; used as the
    SCST reward, where it must score many candidates against the training references quickly.
    Captions are given as token lists.
    """

    def __init__(self, corpus: Iterable[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        counted = [[_ngrams(ref, n) for ref in refs] for refs in corpus]
        self.document_frequency: Counter = Counter()
        for refs in counted:
            self.document_frequency.update({gram for ref in refs for gram in ref})
        self.log_corpus_size = math.log(float(len(counted)))

    def _vector(self, counts: Counter):
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = tf * (self.log_corpus_size - math.log(max(1.0, self.document_frequency[gram])))
            vec[order][gram] = weight
            norm[order] += weight * weight
            if order == 1:  # pycocoevalcap counts length in bigrams; kept for identical scores
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def prepare_references(self, references: Sequence[Sequence[str]]) -> list:
        """Precompute reference vectors once (for scoring many candidates against them)."""
        return [self._vector(_ngrams(ref, self.n)) for ref in references]

    def score(self, candidate: Sequence[str], references) -> float:
        """CIDEr-D of one token list against references (token lists or ``prepare_references`` output)."""
        if references and not isinstance(references[0], tuple):
            references = self.prepare_references(references)
        vec, norm, length = self._vector(_ngrams(candidate, self.n))
        total = 0.0
        for ref_vec, ref_norm, ref_length in references:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for order in range(self.n):
                ref_grams = ref_vec[order]
                dot = sum(min(w, ref_grams.get(g, 0.0)) * ref_grams.get(g, 0.0) for g, w in vec[order].items())
                if norm[order] and ref_norm[order]:
                    dot /= norm[order] * ref_norm[order]
                total += dot * penalty
        return total / self.n / max(1, len(references)) * 10.0
