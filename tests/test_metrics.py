"""coco-caption metrics, the Java-less fallback, and the fast CIDEr-D used for SCST."""

import random

import pytest

from captioner import metrics
from captioner.metrics import CiderD, fallback_tokenize, score_captions
from conftest import need

REFS = {1: ["A dog runs on the grass .", "a brown dog running", "The dog is running outside"],
        2: ["Two children play in the water", "kids splash in a pool", "two kids swim"],
        3: ["A man rides a bike down the street", "a cyclist on a road", "man riding a bicycle"]}


def test_perfect_and_poor_predictions():
    without_meteor = ("BLEU", "ROUGE-L", "CIDEr-D")  # METEOR's own Java start is tested below
    perfect = score_captions({k: v[0] for k, v in REFS.items()}, REFS, without_meteor)
    poor = score_captions({k: "a red car" for k in REFS}, REFS, without_meteor)
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert perfect[name] > poor[name]
    assert perfect["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert poor["distinct_captions"] == pytest.approx(1 / 3)
    assert poor["vocabulary_used"] == 3


@pytest.mark.slow  # starts Java (METEOR, the PTB tokenizer)
def test_java_scorers_present_when_java_is():
    """METEOR (and the PTB tokenizer) need Java: skipped without it on a user's machine, a failure under CI."""
    need(metrics.java_available(), "Java is not installed (METEOR needs it)")
    scores = score_captions({k: v[1] for k, v in REFS.items()}, REFS)
    assert 0.5 < scores["METEOR"] <= 1  # each prediction is one of its references


def test_fallback_without_java(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    metrics._warn_no_java.cache_clear()  # as in a fresh process
    with caplog.at_level("WARNING", logger="captioner.metrics"):
        scores = score_captions({k: v[0] for k, v in REFS.items()}, REFS)
        score_captions({k: v[0] for k, v in REFS.items()}, REFS)
    assert "METEOR" not in scores and scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    warnings = [r for r in caplog.records if "Java" in r.getMessage()]
    assert len(warnings) == 1, "the missing-Java warning is given once, not per call"
    assert fallback_tokenize("A dog's ball, (red)!") == "a dog 's ball red"


def test_missing_references_are_an_error():
    with pytest.raises(ValueError, match="no reference captions"):
        score_captions({1: "a dog", 99: "a cat"}, REFS)


def test_fast_cider_equals_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    words = "a the dog cat man woman runs sits on in grass water red blue street ball".split()
    gts = {i: [" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(5)] for i in range(40)}
    res = {i: [" ".join(rng.choices(words, k=rng.randint(2, 10)))] for i in range(40)}
    expected = Cider().compute_score(gts, res)[1]
    cider = CiderD([[r.split() for r in refs] for refs in gts.values()])
    for i, value in enumerate(expected):
        assert cider.score(res[i][0].split(), [r.split() for r in gts[i]]) == pytest.approx(value, rel=1e-9)
        prepared = cider.prepare_references([r.split() for r in gts[i]])
        assert cider.score(res[i][0].split(), prepared) == pytest.approx(value, rel=1e-9)
