"""The one captioning pipeline (models/pipeline.py): what it answers, and that every front end goes through it."""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch
from conftest import ROOT

from captioner.errors import ImageError
from captioner.models.pipeline import TOP_LABELS, CaptionPipeline


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    return [generator.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(3)]


def test_the_pipeline_answers_what_the_model_says(tiny_model, images):
    config = tiny_model.generation_config.updated(num_return_sequences=2)
    answers = CaptionPipeline(tiny_model)(images, config)
    expected = tiny_model.generate(images, config)
    labels = tiny_model.classify(images, TOP_LABELS)
    assert [[c["text"] for c in answer["captions"]] for answer in answers] == \
        [[c.text for c in captions] for captions in expected]
    assert [answer["captions"][0]["log_prob"] for answer in answers] == \
        [round(captions[0].log_prob, 4) for captions in expected]
    assert [[(row["label"], row["probability"]) for row in answer["labels"]] for answer in answers] == labels
    assert "labels" not in CaptionPipeline(tiny_model, labels=False)(images[:1])[0]


def test_preprocess_takes_any_image_input_and_passes_pixels_through(tiny_model, images):
    pipeline = CaptionPipeline(tiny_model)
    pixels = pipeline.preprocess(images[0])
    assert pixels.dim() == 3 and pixels.shape[0] == 3
    assert pipeline.preprocess(pixels) is pixels  # already preprocessed (the HTTP API's decode pool)
    assert torch.equal(pixels, tiny_model.encoder.pixels(images[0]))
    with pytest.raises(ImageError):
        pipeline.preprocess(b"not an image")


def test_the_two_halves_of_forward_are_forward(tiny_model, images):
    pipeline = CaptionPipeline(tiny_model)
    pixels = torch.stack([pipeline.preprocess(image) for image in images])
    config = tiny_model.generation_config
    whole = pipeline._forward(pixels, config)
    halves = pipeline.decode(pipeline.encode(pixels), config)
    assert [p.captions[0].text for p in whole] == [p.captions[0].text for p in halves]
    assert [p.labels for p in whole] == [p.labels for p in halves]


FRONT_ENDS = ("bulk", "serve")
MODEL_STEPS = {"generate", "classify", "encode", "encode_pixels", "pixels", "caption"}  # the model's and encoder's


def test_no_front_end_runs_the_captioning_steps_itself():
    """The bulk run, the batcher, the demo and the HTTP API caption through the pipeline: none of them calls
    the model's steps (load, encode, generate, classify) directly, so the steps cannot be written twice again."""
    calls = []
    for package in FRONT_ENDS:
        for path in sorted((ROOT / "captioner" / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        node.func.attr in MODEL_STEPS and "model" in ast.unparse(node.func.value):
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}")
    assert not calls, calls
