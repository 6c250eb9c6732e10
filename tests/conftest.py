"""Shared fixtures: synthetic data, a tiny random-weight model, a small trained model, and ../shared/data.

``tiny_model`` (a random decoder, built in a fraction of a second) serves every test whose invariant holds for
any weights: decoding, options, bounds, ONNX agreement, checkpoints. ``trained_model`` and ``trained_run`` train
on the synthetic shapes (about 20 s) and serve only tests marked ``slow``: quality, training behaviour, captions
that must differ by image."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import make_split

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"


def find_shared_data() -> Path | None:
    """``../shared/data`` beside the checkout (or above it, for clones made elsewhere)."""
    if os.environ.get("CAPTIONER_SHARED_DATA"):
        return Path(os.environ["CAPTIONER_SHARED_DATA"])
    for parent in ROOT.parents:
        candidate = parent / "shared" / "data"
        if (candidate / "flickr8k").is_dir():
            return candidate
    return None


def need(condition: bool, reason: str) -> None:
    """Skip on a user's machine, fail under CI, when a test's external requirement is missing."""
    if not condition:
        if IN_CI:
            pytest.fail(f"{reason} (required under CI=true)")
        pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """The caches (the ONNX engine's graphs above all) in a folder of this test session, not the user's: every
    run exports afresh, and processes the tests start inherit it."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["CAPTIONER_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = find_shared_data()
    need(path is not None and (path / "flickr8k" / "images").is_dir(), "../shared/data/flickr8k not available")
    return path


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """train (180 images), val (24) and test (36) splits of coloured shapes, COCO format."""
    folder = tmp_path_factory.mktemp("synthetic")
    make_split(folder, "train", 180, seed=1)
    make_split(folder, "val", 24, seed=2, start_id=10_000)
    make_split(folder, "test", 36, seed=3, start_id=20_000)
    return folder


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture
def train_in_process(capsys):
    """``train_in_process(*ARGS)`` runs ``python train.py ARGS`` by its own function in this process and returns
    what a real process gives: exit status, stdout and stderr (log lines included), without a Python start-up
    and torch import per case. Tests of the entry point itself still start a process."""
    from captioner.cli import train_main

    def run(*args: str) -> subprocess.CompletedProcess:
        logger = logging.getLogger("captioner")
        handler, level = logging.StreamHandler(sys.stderr), logger.level  # sys.stderr: capsys's, at this moment
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING if "--quiet" in args else logging.INFO)  # as main() sets up a process
        capsys.readouterr()
        try:
            code = train_main(list(args))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["train.py", *args], code, captured.out, captured.err)

    return run


TINY_WORDS = ("a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "on", "white", "big", "small")


def random_captioner(seed: int = 0, num_layers: int = 1) -> "Captioner":
    """A captioner with MobileNetV2's ImageNet weights (offline package: real features, ImageNet labels) and a small
    randomly initialised decoder over a 16-word vocabulary. Its output layer is scaled so the next-word
    distributions are peaked like a trained model's (no near-ties for beam and greedy to break differently) and
    captions end at different lengths."""
    import torch

    from captioner import Captioner
    from captioner.models.decoder import DecoderConfig, build_decoder
    from captioner.models.encoder import Encoder
    from captioner.data.vocab import END_ID, SPECIAL_TOKENS, Vocabulary

    torch.manual_seed(seed)
    encoder = Encoder.pretrained("mobilenet_v2")
    vocab = Vocabulary([*SPECIAL_TOKENS, *TINY_WORDS])
    decoder = build_decoder(DecoderConfig(encoder.config.feature_size, len(vocab), embed_size=16, hidden_size=32,
                                          num_layers=num_layers, dropout=0.0, input_dropout=0.0))
    with torch.no_grad():
        decoder.output.weight.mul_(4.0)
        decoder.output.bias[END_ID] = 0.35  # some captions end early, others run to max_length
    return Captioner(encoder, decoder, vocab)


@pytest.fixture(scope="session")
def tiny_model():
    """A random-weight :func:`random_captioner` on PyTorch, for invariants that hold whatever the weights (tests
    change copies of its weights, never the fixture)."""
    return random_captioner()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    """``tiny_model`` saved as a checkpoint folder (its encoder weights are the offline package's, not stored)."""
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def synthetic_config(synthetic: Path, out: Path, cache: Path, **overrides):
    from captioner.train.config import TrainConfig

    values = dict(images=str(synthetic / "images"), train_captions=str(synthetic / "train.json"),
                  val_captions=str(synthetic / "val.json"), out=str(out), encoder="mobilenet_v2",
                  embed_size=64, hidden_size=128, dropout=0.1, input_dropout=0.1, min_word_count=1, epochs=15, batch_size=16,
                  lr=3e-3, patience=0, max_length=12, feature_cache=str(cache), device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_run(synthetic, feature_cache, tmp_path_factory) -> Path:
    """(For ``slow`` tests only: it costs about 20 s.) The output folder of one training run (15 epochs, random decoder weights, MobileNetV2 features) on the
    synthetic shapes: best/, last/, log.jsonl, training.png."""
    from captioner.train.trainer import train

    out = tmp_path_factory.mktemp("trained")
    train(synthetic_config(synthetic, out, feature_cache))
    return out


@pytest.fixture(scope="session")
def trained_model(trained_run):
    """(For ``slow`` tests only.) The best model of ``trained_run``, on PyTorch (tests change copies of its weights)."""
    from captioner import Captioner

    return Captioner.from_pretrained(trained_run / "best", device="cpu", engine="torch")
