"""Where things are and what runs them: the bundled assets, the caches, the engines and the compute device.

A low module, so that the feature cache, the ONNX engine, distributed training and the app can use them
without importing the public model. It imports torch only inside the functions that need it: the command
line's help texts read the paths and engine names here without loading PyTorch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# assets/ sits beside the package in a checkout and inside it (captioner/assets) in an installed wheel.
_PACKAGE = Path(__file__).resolve().parent
ASSETS = _PACKAGE / "assets" if (_PACKAGE / "assets").is_dir() else _PACKAGE.parent / "assets"
BUNDLED_MODEL = ASSETS / "model"
BUNDLED_MODEL_CARD = ASSETS / "MODEL_CARD.md"
EXAMPLES_DIR = ASSETS / "examples"

ENGINES = ("auto", "onnx", "torch")  # what runs a model: see captioner.models.onnx_engine.resolve_engine
ENGINE_NAMES = {"onnx": "ONNX Runtime", "torch": "PyTorch"}


def cache_dir(kind: str) -> Path:
    """This user's cache of ``kind`` (``"features"``, ``"onnx"``): under ``$CAPTIONER_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/captioner``, else ``~/.cache/captioner``. A relative ``$XDG_CACHE_HOME`` is ignored, as the
    XDG spec says: it would put the cache in whatever folder the command runs in."""
    root = os.environ.get("CAPTIONER_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        root = str((Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "captioner")
    return Path(root) / kind


def stage_threads() -> int:
    """CPU threads for each of two stages run at once (bulk captioning encodes one batch while it decodes the
    previous): half of PyTorch's count. Two stages on all the cores each fight over them, which measured more
    CPU time per photo (benchmarks/bulk_caption.py)."""
    import torch

    return max(1, torch.get_num_threads() // 2)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's CPU thread count set to ``count`` inside the block, restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple's MPS, then the CPU; an unavailable device is a :class:`ConfigError`."""
    import torch

    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {str(device)[:40]!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine; use --device cpu or auto")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r}: Apple's MPS is not available on this machine")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return chosen
