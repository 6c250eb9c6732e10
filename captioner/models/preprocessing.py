"""The resize, crop and normalise a backbone's weights were trained with, stored in each checkpoint.

:class:`Preprocessing` is kept in ``config.json`` so transforms and weights cannot drift apart. The
centre crop is what inference sees; the other :data:`VIEWS` (corners, mirrors) are training-time
augmentation from cached features. Very thin or wide images are cut to :data:`MAX_ASPECT_RATIO` first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision.transforms.functional as TF_v1
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torch import nn
from torchvision import models
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping

from ..bounds import check_fields, check_value, option
from ..errors import ConfigError
from .config import CORNERS, VIEWS



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
