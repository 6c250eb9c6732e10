"""The bundled model in assets/model: present, small, safe, and captioning real photos sensibly."""

from __future__ import annotations

import json

import pytest

from captioner import Captioner
from captioner.data.annotations import load_captions
from captioner.metrics import score_captions
from captioner.models.captioner import BUNDLED_MODEL
from conftest import ROOT

EXAMPLES = ROOT / "assets" / "examples"


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    return Captioner.from_pretrained(device="cpu")


def test_bundled_model_is_a_small_safe_checkpoint():
    # The ONNX graphs beside it are written by `make setup` and git-ignored: not part of the shipped size.
    files = {p.name: p.stat().st_size for p in BUNDLED_MODEL.iterdir() if p.suffix != ".onnx"}
    assert {"config.json", "vocab.json", "model.safetensors"} <= set(files)
    assert not [name for name in files if name.endswith((".pt", ".pth", ".bin", ".pkl"))]
    assert sum(files.values()) <= 25 * 2**20
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    # The encoder's ImageNet weights come from the installed package, not from a copy in the repository.
    assert config["encoder"]["name"] == "mobilenet_v2"
    assert "encoder.safetensors" not in files


def test_bundled_model_captions_a_photo_out_of_the_box(bundled):
    # Flickr8k's domain is people, dogs and outdoor action; of the licensable COCO examples, this one is
    # in it (the model card lists what the model says about the others, wrong ones included).
    caption = bundled.caption(EXAMPLES / "skateboarder.jpg")
    assert {"skateboard", "skateboarder", "skateboarding", "skater"} & set(caption.split()), caption


@pytest.mark.slow  # 200 Flickr8k photos
def test_bundled_model_quality_on_flickr8k_test_images(bundled, shared_data):
    """A regression guard on 200 held-out photos; the full test-split figures are in MODEL_CARD.md."""
    folder = shared_data / "flickr8k"
    records, _ = load_captions(folder / "captions_test.json", folder / "images", "test")
    records = records[:200]
    predictions = bundled.caption([r.path for r in records])
    scores = score_captions(dict(enumerate(predictions)), {i: r.captions for i, r in enumerate(records)},
                            metrics=("BLEU", "CIDEr-D"))
    assert scores["BLEU-4"] > 0.15 and scores["CIDEr-D"] > 0.35, scores
    assert scores["distinct_captions"] > 0.4, scores
