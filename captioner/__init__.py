"""captioner: Show-and-Tell image captioning (a pretrained CNN encoder and an LSTM decoder).

>>> from captioner import Captioner
>>> Captioner.from_pretrained().caption("photo.jpg")

``import captioner`` loads no PyTorch: :class:`Captioner`, :class:`Caption` and :class:`GenerationConfig` are
imported on first use (PEP 562), so the command line's help and ``captioner merge`` start in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
           CaptionerError,
           CheckpointError,
           ConfigError,
           DataError,
           ImageError,
           WeightsError,
)

if TYPE_CHECKING:
    from .generation.config import GenerationConfig
    from .generation.search import Caption
    from .models.captioner import Captioner

_LAZY = {"Captioner": ".models.captioner", "Caption": ".generation.search", "GenerationConfig": ".generation.config"}

__all__ = ["Captioner", "Caption", "GenerationConfig", "CaptionerError", "CheckpointError", "ConfigError",
           "DataError", "ImageError", "WeightsError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``captioner.Captioner`` and the other lazy names: their module imported on first use, then kept here."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
