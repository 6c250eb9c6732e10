"""captioner: Show-and-Tell image captioning (a pretrained CNN encoder and an LSTM decoder).

>>> from captioner import Captioner
>>> Captioner.from_pretrained().caption("photo.jpg")
"""

from .errors import (
           CaptionerError,
           CheckpointError,
           ConfigError,
           DataError,
           ImageError,
           WeightsError,
)
from .generation.config import GenerationConfig
from .generation.search import Caption
from .models.captioner import Captioner

__all__ = ["Captioner", "Caption", "GenerationConfig", "CaptionerError", "CheckpointError", "ConfigError",
           "DataError", "ImageError", "WeightsError"]
__version__ = "0.1.0"
