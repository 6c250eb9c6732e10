"""Encode each image once: feature extraction and its on-disk cache.

Training the decoder from cached features makes an epoch cost only the LSTM. The cache is one
safetensors file per encoder configuration, named by a hash of the backbone, its weights id and
its preprocessing; inside, rows are indexed by a hash of each image file's bytes. So a change of
encoder, weights or preprocessing uses another file, and an edited image is simply re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import load_tensors, save_tensors
from .distributed import Distributed
from .encoder import Encoder
from .images import load_image

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captioner" / "features"


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
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def file_digests(paths: Sequence[str | Path], progress: bool = True) -> list[str]:
    """Content hashes of image files: a cache row belongs to the file's bytes, not to its name."""
    return [file_digest(p) for p in tqdm(paths, desc="hashing images", disable=not progress, leave=False)]


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], encoder: Encoder, view: str):
        self.paths = list(paths)
        self.preprocess = encoder.preprocess if view == "center" else encoder.config.preprocessing.view_transform(view)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_image(self.paths[index]))


@torch.inference_mode()
def extract_features(encoder: Encoder, paths: Sequence[str | Path], batch_size: int = 32, num_workers: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True, view: str = "center") -> torch.Tensor:
    """Run the encoder over image files: ``(len(paths), feature_size)`` float32 on the CPU.

    ``view`` picks the centre crop (what inference sees) or another crop or mirror image for augmentation.
    """
    device = torch.device(device)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    encoder = encoder.to(device, memory_format=layout).eval()
    loader = DataLoader(_ImageFiles(paths, encoder, view), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    chunks = [encoder(pixels.to(device, memory_format=layout, non_blocking=True)).float().cpu()
              for pixels in tqdm(loader, desc=f"encoding images ({view})", unit="batch", disable=not progress)]
    return torch.cat(chunks) if chunks else torch.empty((0, encoder.config.feature_size))


class FeatureCache:
    """Features of image files for one encoder configuration and view, stored under ``directory``."""

    def __init__(self, directory: str | Path, encoder: Encoder, view: str = "center"):
        self.encoder, self.view = encoder, view
        self.path = Path(directory) / f"{encoder.config.name}-{cache_key(encoder, view)}.safetensors"

    def _read(self) -> tuple[list[str], torch.Tensor | None]:
        if not self.path.is_file():
            return [], None
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as handle:
            digests = json.loads(handle.metadata()["digests"])
        return digests, load_tensors(self.path)["features"]

    def get(self, paths: Sequence[str | Path], batch_size: int = 32, num_workers: int = 0,
            device: str | torch.device = "cpu", progress: bool = True,
            dist: Distributed | None = None, digests: Sequence[str] | None = None) -> tuple[torch.Tensor, int]:
        """Features for ``paths`` in order, encoding only images not cached; returns (features, encoded).

        ``digests`` (from :func:`file_digests`) saves re-reading the files when several views share them.
        Under ``torchrun`` each rank encodes its share of the missing images, the shares are gathered,
        and rank 0 writes the cache.
        """
        dist = dist or Distributed()
        show = progress and dist.is_main
        digests = list(digests) if digests is not None else file_digests(paths, show)
        cached_digests, cached = self._read()
        row_of = {digest: row for row, digest in enumerate(cached_digests)}
        missing = sorted({d: p for d, p in zip(digests, paths) if d not in row_of}.items())
        if missing:
            mine = [p for _, p in missing[dist.rank::dist.world_size]]
            fresh = extract_features(self.encoder, mine, batch_size, num_workers, device, show, self.view)
            fresh = dist.gather_rows(fresh, len(missing))
            new_digests = [d for d, _ in missing]
            cached = fresh if cached is None else torch.cat([cached, fresh])
            for digest in new_digests:
                row_of[digest] = len(row_of)
            if dist.is_main:
                self._write(cached_digests + new_digests, cached)
            dist.barrier()
        return cached[[row_of[d] for d in digests]], len(missing)

    def _write(self, digests: list[str], features: torch.Tensor) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        save_tensors({"features": features}, temporary, metadata={"digests": json.dumps(digests)})
        os.replace(temporary, self.path)
