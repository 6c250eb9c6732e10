"""The option dataclasses and names of the networks, free of PyTorch: what ``config.json`` and the command line's
flags are checked against before any network is built.

The training options (:mod:`captioner.train.config`) take their defaults and bounds from these, so ``captioner
train --help`` and every config check run without importing torch or torchvision. :mod:`.decoder`,
:mod:`.preprocessing` and :mod:`.weights` build on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..bounds import check_fields, option
from ..errors import ConfigError

BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2")  # see weights.BACKBONES
DEFAULT_ENCODER = "resnet50"
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
VIEWS = ("center", "flip", *CORNERS[:4], *(f"flip-{corner}" for corner in CORNERS[:4]))  # torchvision's TenCrop

MAX_VOCAB_SIZE = 1_000_000
MAX_WIDTH = 8192  # embedding and LSTM sizes
MAX_MEMBERS = 8  # decoders in an ensemble: each step costs one decoder step per member


@dataclass
class DecoderConfig:
    """The decoder's shape; bounds are checked on creation, before any weight is allocated."""

    feature_size: int = field(metadata={"range": (1, 65536)})
    vocab_size: int = field(metadata={"range": (5, MAX_VOCAB_SIZE)})
    embed_size: int = option(512, range=(1, MAX_WIDTH))
    hidden_size: int = option(512, range=(1, MAX_WIDTH))
    num_layers: int = option(1, range=(1, 8))
    dropout: float = option(0.5, "on LSTM outputs (and between LSTM layers)", range=(0.0, 0.99))
    input_dropout: float = option(0.5, "on image features, the image projection and word embeddings", range=(0.0, 0.99))
    members: int = option(1, "decoders of this shape in an ensemble (their next-word probabilities averaged)",
                          range=(1, MAX_MEMBERS))

    def __post_init__(self) -> None:
        check_fields(self, ConfigError, "decoder")

    def to_dict(self) -> dict:
        return asdict(self)
