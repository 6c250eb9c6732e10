"""The training data of a run as plain values: each set's records, the vocabulary over all training sets, the
records' cached encoder features, and which rows each step of an epoch takes.

:func:`load_sets` -> :func:`vocabulary` -> :func:`encode_split` (through :mod:`.features`' cache) ->
:class:`Batches` (every set's rows weighted, shuffled, split across ranks). Nothing here holds loop state:
a step's rows are a function of the epoch, so a resumed run draws the batches the uninterrupted one drew.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler

from ..data.annotations import ImageCaptions, load_captions
from ..data.vocab import Vocabulary
from ..distributed import Distributed
from ..errors import DataError
from ..models.encoder import Encoder
from ..runtime import cache_dir
from .config import Dataset, TrainConfig
from .features import FeatureCache, file_digests

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Images ready for training or validation: the records, the dataset each comes from (an index into the
    run's training or validation sets) and their encoder features (None when the CNN is fine-tuned)."""

    records: list[ImageCaptions]
    sets: torch.Tensor  # (N,) long
    features: torch.Tensor | None

    def references(self) -> dict[int, list[str]]:
        return {i: r.captions for i, r in enumerate(self.records)}


def load_sets(sets: list[Dataset], split: str, skip_invalid: bool) -> tuple[list[ImageCaptions], list[int]]:
    """The records of every set, one after the other, and the index of the set of each."""
    records: list[ImageCaptions] = []
    owners: list[int] = []
    for index, dataset in enumerate(sets):
        found, report = load_captions(dataset.captions, dataset.images, split, skip_invalid)
        if report.skipped:
            log.warning("%s: skipped %d invalid item(s) (--skip-invalid), e.g. %s", dataset.captions,
                        len(report.skipped), report.skipped[0])
        log.info("data: %s set %s: %d images (%d captions)%s", split, dataset.name, len(found),
                 sum(len(r.captions) for r in found), f", weight {dataset.weight:g}" if dataset.weight != 1 else "")
        records.extend(found)
        owners.extend([index] * len(found))
    return records, owners


def vocabulary(records: list[ImageCaptions], min_word_count: int) -> Vocabulary:
    """One vocabulary over the captions of ``records`` (every training set's, for a new run)."""
    return Vocabulary.build((c for r in records for c in r.captions), min_word_count)


def encode_split(config: TrainConfig, encoder: Encoder, dist: Distributed, records: list[ImageCaptions],
                 owners: list[int], views: tuple[str, ...] = ("center",)) -> Split:
    """The records kept with their cached encoder features: ``(N, F)``, or ``(views, N, F)`` with augmentation;
    None when the encoder is fine-tuned. With ``skip_invalid`` images that cannot be decoded are left out.
    One cache serves every set: its rows are keyed by each file's bytes, wherever the file lives."""
    if config.finetune_encoder:
        return Split(records, torch.tensor(owners), None)
    paths, stacked = [r.path for r in records], list[torch.Tensor]()
    digests = file_digests(paths, dist.is_main)  # once for all views
    for view in views:
        cache = FeatureCache(config.feature_cache or cache_dir("features"), encoder, view)
        # the first view finds the images that cannot be decoded; later views get only the others
        features, encoded, unreadable = cache.get(paths, num_workers=config.num_workers, device=dist.device,
                                                  dist=dist, digests=digests,
                                                  skip_invalid=config.skip_invalid and not stacked)
        log.info("features (%s): %d images, %d newly encoded, cache %s", view, len(records), encoded, cache.path)
        if unreadable:
            log.warning("skipped %d image(s) that cannot be read (--skip-invalid), e.g. %s", len(unreadable),
                        next(iter(unreadable.values())))
            kept = [i for i in range(len(records)) if i not in unreadable]
            if not kept:
                raise DataError(f"none of the {len(records)} images can be read")
            records, paths = [records[i] for i in kept], [paths[i] for i in kept]
            digests, owners = [digests[i] for i in kept], [owners[i] for i in kept]
        stacked.append(features.to(dist.device))
    return Split(records, torch.tensor(owners), stacked[0] if len(stacked) == 1 else torch.stack(stacked))


def weighted_rows(sets: torch.Tensor, weights: list[float], generator: torch.Generator) -> torch.Tensor:
    """The rows one epoch visits: each row of set ``i`` ``int(weights[i])`` times, plus a random
    ``weights[i] % 1`` share of that set's rows once more (``round`` of it, so the count is fixed)."""
    chosen = []
    for index, weight in enumerate(weights):
        rows = torch.nonzero(sets == index).flatten()
        whole, part = int(weight), round((weight % 1) * len(rows))
        chosen.extend([rows] * whole)
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:part]])
    return torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)


class Batches:
    """Which rows each step of an epoch takes, on this rank: every set's rows weighted (:func:`weighted_rows`,
    drawn afresh from ``seed`` each epoch, the same on every rank), shuffled and dealt out so that the union over
    the ranks of each step is one global batch. ``photo_sets`` is the training set of each photo,
    ``caption_photos`` the photo of each caption."""

    def __init__(self, photo_sets: torch.Tensor, caption_photos: torch.Tensor, weights: list[float], seed: int,
                 world_size: int = 1, rank: int = 0):
        self.photo_sets, self.caption_photos, self.weights = photo_sets, caption_photos, weights
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.caption_sets = photo_sets[caption_photos]  # the training set of each caption
        order = torch.argsort(caption_photos, stable=True)
        self.caption_rows = list(torch.split(order, torch.bincount(caption_photos,
                                                                   minlength=len(photo_sets)).tolist()))

    def xe(self, epoch: int, batch_size: int, whole_photos: bool = False) -> list[torch.Tensor]:
        """The caption rows of each cross-entropy step: ``batch_size`` shuffled captions; or, ``whole_photos`` (when
        the CNN is trained), all the captions of as many whole photos, so that each photo goes through it once."""
        if not whole_photos:
            return self.share(self.epoch_rows(self.caption_sets, epoch), batch_size, epoch)
        per_photo = len(self.caption_photos) / max(1, len(self.photo_sets))
        photos = self.photos(epoch, max(1, round(batch_size / per_photo)))
        return [torch.cat([self.caption_rows[i] for i in batch.tolist()]) for batch in photos]

    def photos(self, epoch: int, batch_size: int) -> list[torch.Tensor]:
        """The photo rows of each step (SCST's, and the fine-tuned CNN's)."""
        return self.share(self.epoch_rows(self.photo_sets, epoch), batch_size, epoch)

    def epoch_rows(self, sets: torch.Tensor, epoch: int) -> torch.Tensor:
        """The rows (captions or photos, by the set of each) this epoch visits, each set's weighted."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return weighted_rows(sets, self.weights, generator)

    def share(self, rows: torch.Tensor, global_size: int, epoch: int) -> list[torch.Tensor]:
        """This rank's share of each global batch of ``rows``; the union over ranks is one shuffled batch."""
        # the sampler needs only len() of its "dataset" of indices; torch's annotation asks for a Dataset
        sampler: DistributedSampler[int] = DistributedSampler(range(len(rows)),  # type: ignore[arg-type]
                                                              self.world_size, self.rank, shuffle=True, seed=self.seed)
        sampler.set_epoch(epoch)
        mine = rows[torch.tensor(list(sampler), dtype=torch.long)]
        size = max(1, global_size // self.world_size)
        return [mine[i:i + size] for i in range(0, len(mine), size)]
