"""The captioning steps every front end shares, written once: ``preprocess`` -> ``_forward`` -> ``postprocess``.

Hugging Face's pipeline shape. ``preprocess`` turns one image input into the pixels the encoder's weights were
trained on; ``_forward`` runs a batch of them through the CNN once (:meth:`encode`), then the search for a decoding
config and the CNN's own labels from the same features (:meth:`decode`); ``postprocess`` turns one photo's
:class:`Prediction` into the JSON fields every answer carries. The bulk run (which encodes one batch ahead of the
search, so calls the two halves of ``_forward`` itself), the micro-batcher behind the HTTP API and the demo, and
the API's callers all go through it, so a photo is captioned and answered the same way whichever way it comes in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.images import ImageInput
from ..generation.config import GenerationConfig
from ..generation.search import Caption
from .captioner import MAX_BATCH_SIZE, Captioner

__all__ = ["TOP_LABELS", "CaptionPipeline", "Prediction"]

TOP_LABELS = 5  # the CNN's ImageNet labels given with each photo's captions


@dataclass(frozen=True)
class Prediction:
    """One photo's captions (best first) and, when asked for, the CNN's top labels."""

    captions: list[Caption]
    labels: list[tuple[str, float]] | None


class CaptionPipeline:
    """``CaptionPipeline(model)(["a.jpg", "b.jpg"])``: each photo's answer fields (captions, labels) in order."""

    def __init__(self, model: Captioner, labels: bool = True):
        self.model, self.labels = model, labels

    def preprocess(self, image: ImageInput | torch.Tensor) -> torch.Tensor:
        """One image input as pixels ``(3, H, W)`` (:meth:`Encoder.pixels`); pixels preprocessed already (the HTTP
        API's decode pool) pass as they are. An unreadable image raises :class:`ImageError`."""
        return image if isinstance(image, torch.Tensor) else self.model.encoder.pixels(image)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The first half of :meth:`_forward`: the CNN's features of a batch of pixels ``(N, 3, H, W)``."""
        return self.model.encode_pixels(pixels)

    @torch.inference_mode()
    def decode(self, features: torch.Tensor, config: GenerationConfig) -> list[Prediction]:
        """The second half of :meth:`_forward`: one search over the batch's features as ``config`` says, and, with
        ``labels``, the CNN's labels from the same features."""
        found = self.model.generate(features, config, batch_size=min(max(1, len(features)), MAX_BATCH_SIZE))
        labels: Sequence = self.model.encoder.classify(features, TOP_LABELS) if self.labels else [None] * len(found)
        return [Prediction(captions, top) for captions, top in zip(found, labels)]

    def _forward(self, pixels: torch.Tensor, config: GenerationConfig) -> list[Prediction]:
        return self.decode(self.encode(pixels), config)

    @staticmethod
    def postprocess(prediction: Prediction) -> dict:
        """A photo's answer as JSON: the same fields in the JSON-lines records and the HTTP API's answers."""
        fields: dict = {"captions": [{"text": c.text, "log_prob": round(c.log_prob, 4), "score": round(c.score, 4)}
                                     for c in prediction.captions]}
        if prediction.labels is not None:
            fields["labels"] = [{"label": label, "probability": p} for label, p in prediction.labels]
        return fields

    def __call__(self, images: Sequence[ImageInput], config: GenerationConfig | None = None) -> list[dict]:
        pixels = torch.stack([self.preprocess(image) for image in images])
        predictions = self._forward(pixels, config or self.model.generation_config)
        return [self.postprocess(prediction) for prediction in predictions]
