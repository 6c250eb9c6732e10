"""The one image loader: batches of preprocessed photos from worker processes, with unreadable files listed.

Feature extraction, bulk captioning and evaluation all read images through :func:`image_batches`, so a
file that cannot be read is reported the same way everywhere and never stops the rest of its batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageError, LoaderError


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[str | Path], load: Callable[[str | Path], torch.Tensor]):
        self.paths, self.load = list(paths), load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        """The preprocessed image, or why it cannot be read: one bad file must not fail its whole batch."""
        try:
            return index, self.load(self.paths[index])
        except ImageError as exc:
            return index, str(exc)


class ImageBatch(NamedTuple):
    indices: list[int]  # positions in the paths of the images in ``pixels``
    pixels: torch.Tensor | None  # (len(indices), 3, H, W), None when no image of the batch could be read
    failures: dict[int, str]  # position in the paths -> why that image cannot be read


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> ImageBatch:
    images = [(index, item) for index, item in items if not isinstance(item, str)]
    failures = {index: item for index, item in items if isinstance(item, str)}
    return ImageBatch([index for index, _ in images], torch.stack([item for _, item in images]) if images else None,
                      failures)


def image_batches(load: Callable[[str | Path], torch.Tensor], paths: Sequence[str | Path], batch_size: int,
                  num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches (:class:`ImageBatch`) of ``batch_size`` of ``paths``, in order, each file read and preprocessed
    by ``load`` (which raises :class:`ImageError` for a file it cannot read, e.g. ``Encoder.pixels``) in
    ``num_workers`` worker processes with prefetch (0: in this process).

    Unreadable files are listed in each batch's ``failures``, never raised. A single batch is loaded in this
    process: workers would only add their start-up to it."""
    return DataLoader(_ImageFiles(paths, load), batch_size=batch_size,
                      num_workers=num_workers if len(paths) > batch_size else 0, pin_memory=pin_memory,
                      collate_fn=_collate)

@contextlib.contextmanager
def loader_deaths(hint: str) -> Iterator[None]:
    """Turn PyTorch's ``RuntimeError`` for a loader worker that died (killed by hand or by the out-of-memory
    killer) into a one-line :class:`LoaderError` ending in ``hint``. PyTorch raises it from a SIGCHLD handler,
    so anywhere in this thread while the loader runs: put the whole loop over the batches inside."""
    try:
        yield
    except RuntimeError as exc:
        if not str(exc).startswith("DataLoader worker (pid"):
            raise
        raise LoaderError(f"an image loading process died ({str(exc).split('. ')[0].removeprefix('DataLoader ')}); "
                          f"{hint}") from None
