"""Encode each image once: feature extraction and its on-disk cache.

Training the decoder from cached features makes an epoch cost only the LSTM. The cache is one
safetensors file per encoder configuration, named by a hash of the backbone, its weights id and
its preprocessing; inside, rows are indexed by a hash of each image file's bytes. So a change of
encoder, weights or preprocessing uses another file, and an edited image is simply re-encoded.

New rows are flushed every ``FLUSH_EVERY`` images to a part file beside the cache and merged into
it at the end, so a killed run loses at most one part's work. A cache file that cannot be read,
and rows that are not finite, are ignored with a warning and encoded again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..checkpoint import save_tensors
from ..data.loader import image_batches
from ..distributed import Distributed
from ..errors import ImageError, OutputError
from ..files import atomic_file
from ..models.encoder import Encoder

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
FLUSH_EVERY = 1024  # images per part file: about a minute of CPU encoding, seconds on a GPU


def cache_key(encoder: Encoder, view: str = "center") -> str:
    """Hash of everything that changes an image's feature vector, except the image itself.

    Pretrained weights are identified by their torchvision id or file hash; other weights (random,
    fine-tuned) by a digest of the parameters themselves.
    """
    config = encoder.config
    weights = str(config.weights)
    if config.weights.kind in ("random", "fine-tuned"):
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        weights = f"{weights}:{digest.hexdigest()}"
    identity = {"format": CACHE_FORMAT, "name": config.name, "weights": weights,
                "preprocessing": config.to_dict()["preprocessing"]}
    if view != "center":
        identity["view"] = view
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    """Hash of a file's bytes, read in pieces so that an oversized file costs time, not memory."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            while piece := handle.read(1 << 20):
                digest.update(piece)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def file_digests(paths: Sequence[str | Path], progress: bool = True) -> list[str]:
    """Content hashes of image files: a cache row belongs to the file's bytes, not to its name."""
    return [file_digest(p) for p in tqdm(paths, desc="hashing images", disable=not progress, leave=False)]


@torch.inference_mode()
def _encode(encoder: Encoder, paths: Sequence[str | Path], batch_size: int, num_workers: int,
            device: str | torch.device, view: str, bar: tqdm) -> tuple[torch.Tensor, dict[int, str]]:
    """Features of ``paths`` (zeros for an image that cannot be read) and, by index, why those cannot."""
    device = torch.device(device)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    encoder = encoder.to(device).to(memory_format=layout).eval()
    rows, failures = torch.zeros((len(paths), encoder.config.feature_size)), dict[int, str]()
    for indices, pixels, failed in image_batches(functools.partial(encoder.pixels, view=view), paths, batch_size,
                                                     num_workers, device.type == "cuda"):
        if indices:
            rows[indices] = encoder(pixels.to(device, memory_format=layout, non_blocking=True)).float().cpu()
        failures.update(failed)
        bar.update(len(indices) + len(failed))
    return rows, failures


def _unreadable(failures: dict[int, str], total: int) -> str:
    return f"{len(failures)} of {total} images cannot be read, e.g. {failures[min(failures)]}"


def extract_features(encoder: Encoder, paths: Sequence[str | Path], batch_size: int = 32, num_workers: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True, view: str = "center") -> torch.Tensor:
    """Run the encoder over image files: ``(len(paths), feature_size)`` float32 on the CPU, or
    :class:`ImageError` when some cannot be read.

    ``view`` picks the centre crop (what inference sees) or another crop or mirror image for augmentation.
    """
    with tqdm(total=len(paths), desc=f"encoding images ({view})", unit="image", disable=not progress) as bar:
        rows, failures = _encode(encoder, paths, batch_size, num_workers, device, view, bar)
    if failures:
        raise ImageError(_unreadable(failures, len(paths)))
    return rows


class CachedFeatures(NamedTuple):
    features: torch.Tensor  # one row per readable image, in the order of the paths
    encoded: int  # images newly encoded
    unreadable: dict[int, str]  # index in the paths -> why that image was left out (only with skip_invalid)


class FeatureCache:
    """Features of image files for one encoder configuration and view, stored under ``directory``."""

    def __init__(self, directory: str | Path, encoder: Encoder, view: str = "center"):
        self.encoder, self.view = encoder, view
        self.path = Path(directory) / f"{encoder.config.name}-{cache_key(encoder, view)}.safetensors"

    def get(self, paths: Sequence[str | Path], batch_size: int = 32, num_workers: int = 0,
            device: str | torch.device = "cpu", progress: bool = True, dist: Distributed | None = None,
            digests: Sequence[str] | None = None, skip_invalid: bool = False,
            flush_every: int = FLUSH_EVERY) -> CachedFeatures:
        """Features for ``paths`` in order, encoding only images not cached.

        ``digests`` (from :func:`file_digests`) saves re-reading the files when several views share them.
        New rows are written every ``flush_every`` images. Images that cannot be decoded raise
        :class:`ImageError` once the others are encoded and cached; with ``skip_invalid`` they are left
        out of ``features`` and listed in ``unreadable``. Under ``torchrun`` each rank encodes its share
        of each flush, the shares are gathered, and rank 0 writes the cache.
        """
        dist = dist or Distributed()
        show = progress and dist.is_main
        digests = list(digests) if digests is not None else file_digests(paths, show)
        cached_digests, cached, parts, dropped = self._read()
        row_of = {digest: row for row, digest in enumerate(cached_digests)}
        missing = sorted({d: p for d, p in zip(digests, paths) if d not in row_of}.items())
        blocks, rows_so_far, failed = [cached], len(cached), dict[str, str]()  # digest: why it cannot be read
        with tqdm(total=len(missing), desc=f"encoding images ({self.view})", unit="image", disable=not show) as bar:
            for start in range(0, len(missing), flush_every):
                chunk = missing[start:start + flush_every]
                mine = [p for _, p in chunk[dist.rank::dist.world_size]]
                rows, failures = _encode(self.encoder, mine, batch_size, num_workers, device, self.view, bar)
                rows = dist.gather_rows(rows, len(chunk))
                failures = {rank + dist.world_size * i: reason for rank, share in enumerate(dist.gather(failures))
                            for i, reason in share.items()}
                good = [i for i in range(len(chunk)) if i not in failures]
                if dist.is_main and good:
                    parts.append(self._write([chunk[i][0] for i in good], rows[good], part=True))
                row_of.update((chunk[i][0], rows_so_far + k) for k, i in enumerate(good))
                blocks.append(rows[good])
                rows_so_far += len(good)
                failed.update((chunk[i][0], reason) for i, reason in failures.items())
                bar.update(start + len(chunk) - bar.n)  # under torchrun the bar counted only this rank's share
        features = torch.cat(blocks)
        if dist.is_main and (parts or dropped):
            kept = list(row_of)
            self._write(kept, features[[row_of[d] for d in kept]])
            for part in parts:
                part.unlink(missing_ok=True)
        dist.barrier()
        unreadable = {i: failed[d] for i, d in enumerate(digests) if d in failed}
        if unreadable and not skip_invalid:
            raise ImageError(f"{_unreadable(unreadable, len(paths))}; the features of the others are cached; "
                             "pass --skip-invalid to leave these images out")
        return CachedFeatures(features[[row_of[d] for d in digests if d not in failed]], len(missing) - len(failed),
                              unreadable)

    def _read(self) -> tuple[list[str], torch.Tensor, list[Path], bool]:
        """Digests and rows of the cache file and of the parts a stopped run flushed; those parts; and whether
        anything was left out (an unreadable file, rows that are not finite), so the cache needs rewriting."""
        digests, blocks, dropped = [], [], False
        parts = sorted(self.path.parent.glob(f"{self.path.stem}.part-*.safetensors"))
        for file in [self.path, *parts]:
            try:
                names, rows = self._load(file)
            except FileNotFoundError:  # no cache yet, or a part another run merged meanwhile
                continue
            except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
                log.warning("%s: ignoring an unreadable feature cache file (%s); its images are encoded again",
                            file, exc)
                dropped = True
                continue
            finite = torch.isfinite(rows).all(1)
            if not finite.all():
                log.warning("%s: ignoring %d feature rows that are not finite; their images are encoded again",
                            file, int((~finite).sum()))
                names, rows, dropped = [n for n, ok in zip(names, finite.tolist()) if ok], rows[finite], True
            digests += names
            blocks.append(rows)
        return digests, torch.cat(blocks) if blocks else torch.empty((0, self.encoder.config.feature_size)), parts, dropped

    def _load(self, file: Path) -> tuple[list[str], torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            digests = json.loads(handle.metadata()["digests"])
            rows = handle.get_tensor("features")
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            raise ValueError("its digests are not a list of strings")
        size = self.encoder.config.feature_size
        if not rows.is_floating_point() or rows.shape != (len(digests), size):
            raise ValueError(f"{rows.dtype} features of shape {tuple(rows.shape)}, expected ({len(digests)}, {size})")
        return digests, rows.float()

    def _write(self, digests: list[str], features: torch.Tensor, part: bool = False) -> Path:
        """Write rows atomically (:func:`captioner.files.atomic_file`): the cache file, or a new part of it."""
        unique = f"{os.getpid()}-{os.urandom(4).hex()}"
        target = self.path.with_name(f"{self.path.stem}.part-{unique}.safetensors") if part else self.path
        try:
            with atomic_file(target, stale=f".{self.path.stem}*.tmp-*") as temporary:  # the parts' too
                save_tensors({"features": features}, temporary, metadata={"digests": json.dumps(digests)})
        except (OSError, SafetensorError) as exc:
            raise OutputError(f"{target.parent}: cannot write the feature cache ({getattr(exc, 'strerror', None) or exc})"
                              "; free some space or choose another --feature-cache") from None
        return target
