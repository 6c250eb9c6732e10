"""Training: the loop of one run, from annotations to ``best/``; nanoGPT-plain, top to bottom as the run goes.

1. load and validate the annotations, build the vocabulary (options: :mod:`.config`);
2. encode every image once through the feature cache (or, with ``finetune_encoder``, run the CNN
   per batch and train it too, at a lower learning rate);
3. train with cross-entropy and teacher forcing (Adam, gradient-norm clipping, dropout, label
   smoothing, optional scheduled sampling, a cosine learning-rate schedule);
4. after each epoch caption the validation images with the model's own decoding settings, score
   them with the coco-caption metrics, keep ``best/`` and ``last/`` checkpoints, stop early when the
   selection metric stops improving;
5. optionally continue with self-critical sequence training (:mod:`.scst`): each sampled caption is
   rewarded by its CIDEr-D minus a baseline, by default the mean CIDEr-D of the image's other samples
   (``scst_baseline="greedy"``: that of the greedy caption).
Every epoch rewrites ``log.jsonl`` and ``training.png`` (:mod:`.run_folder`, which also claims
``--out`` before any work) and adds to the TensorBoard events (:mod:`.tensorboard`); ``last/``
carries the optimizer, scheduler and random-number state (:mod:`.state`), so ``resume`` continues
exactly where the last complete epoch ended. A run may train on several datasets (each with a
sampling weight) and validate on several; ``select_set`` picks the scores that choose ``best/``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .. import checkpoint
from ..data.annotations import ImageCaptions, encode_captions, load_captions
from ..data.vocab import PAD_ID, Vocabulary
from ..distributed import Distributed
from ..errors import CheckpointError, ConfigError, DataError, OutputError
from ..metrics import FAST_METRICS, score_captions
from ..models.captioner import Captioner
from ..models.decoder import Decoder, DecoderConfig
from ..models.encoder import Encoder
from ..models.weights import EncoderWeights
from ..runtime import cache_dir
from . import state as train_state
from .config import AUGMENTATIONS, SELECT_MEAN, Dataset, TrainConfig
from .features import FeatureCache, extract_features, file_digests
from .run_folder import LOG_FILE, claim_output, write_log
from .scst import SelfCritical, dropout_off, policy_loss
from .state import Progress
from .tensorboard import SAMPLE_PHOTOS, TensorBoard

log = logging.getLogger(__name__)

COLLAPSE_THRESHOLD = 0.1  # distinct validation captions per image below which training warns


# ------------------------------------------------------------------------------------------------ data
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


def initial_model(config: TrainConfig, records: list[ImageCaptions]) -> Captioner:
    """The model a new run starts from: a vocabulary of ``records``' captions, the pretrained CNN and a random
    decoder; or, with ``init_from``, that checkpoint's vocabulary, encoder (unless ``encoder_weights``) and
    decoder (``init_member`` of an ensemble), with this run's dropout. The decoder's shape must be the options'."""
    if not config.init_from:
        vocab = Vocabulary.build((c for r in records for c in r.captions), config.min_word_count)
        encoder = Encoder.pretrained(config.encoder, config.encoder_weights or None)
        decoder = Decoder(DecoderConfig(encoder.config.feature_size, len(vocab), config.embed_size, config.hidden_size,
                                        config.num_layers, config.dropout, config.input_dropout))
        return Captioner(encoder, decoder, vocab, config.generation())
    start = Captioner.from_pretrained(config.init_from, device="cpu", engine="torch",
                                      encoder_weights=config.encoder_weights or None)
    members = start.decoder.decoders()
    if len(members) > 1 and not 1 <= config.init_member <= len(members):
        raise ConfigError(f"--init-member {config.init_member}: {config.init_from} is an ensemble of {len(members)} "
                          f"decoders; pick one, 1 to {len(members)}")
    if len(members) == 1 and config.init_member > 1:
        raise ConfigError(f"--init-member {config.init_member}: {config.init_from} has one decoder")
    member = members[max(1, config.init_member) - 1]
    if start.encoder.config.name != config.encoder:
        raise ConfigError(f"--init-from {config.init_from} has encoder {start.encoder.config.name}, this run asks "
                          f"for {config.encoder}")
    for name in ("embed_size", "hidden_size", "num_layers"):
        if getattr(member.config, name) != getattr(config, name):
            raise ConfigError(f"--init-from {config.init_from} has {name} {getattr(member.config, name)}, this run "
                              f"asks for {getattr(config, name)}")
    decoder = Decoder(replace(member.config, dropout=config.dropout, input_dropout=config.input_dropout))
    decoder.load_state_dict(member.state_dict())
    log.info("starting from %s%s (its vocabulary; min_word_count is not used)", config.init_from,
             f", member {config.init_member}" if len(members) > 1 else "")
    return Captioner(start.encoder, decoder, start.vocab, config.generation())


class Trainer:
    """Holds the model, the data and the optimisation state of one run (one rank of it under torchrun)."""

    def __init__(self, config: TrainConfig, resume: bool = False, dist: Distributed | None = None):
        config.validate()
        self.config, self.out = config, Path(config.out)
        self.dist = dist or Distributed.setup(config.device)
        self.device = self.dist.device
        if config.batch_size % self.dist.world_size:
            raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {self.dist.world_size} processes")
        if not self.dist.is_main:
            log.setLevel(logging.WARNING)
        torch.manual_seed(config.seed)
        self.train_sets, self.val_sets = config.datasets()
        train_records, train_owners = load_sets(self.train_sets, "train", config.skip_invalid)
        val_records, val_owners = load_sets(self.val_sets, "val", config.skip_invalid)
        last = checkpoint.recover(self.out / "last")
        self.progress = Progress()
        if resume:
            if not last.is_dir():
                raise CheckpointError(f"{last}: nothing to resume (no last checkpoint in {self.out})")
            # PyTorch, not ONNX Runtime: the exported graphs are a snapshot, and validation must see each step
            self.model = Captioner.from_pretrained(last, device=self.device, engine="torch")
        else:
            self.model = initial_model(config, train_records).to(self.device)
            if config.finetune_encoder:
                self.model.encoder.config.weights = EncoderWeights("fine-tuned")
        log.info("vocabulary: %d words; encoder %s (%s); %d process(es) on %s", len(self.model.vocab),
                 self.model.encoder.config.name, self.model.encoder.config.weights, self.dist.world_size,
                 self.device)
        self.train_split = self._features(train_records, train_owners, AUGMENTATIONS[config.augment])
        self.captions = encode_captions(self.train_split.records, self.model.vocab, config.max_caption_length)
        if self.captions.truncated:
            log.info("%d training captions were cut to %d words", self.captions.truncated, config.max_caption_length)
        self.val_split = self._features(val_records, val_owners)
        order = torch.argsort(self.captions.image_index, stable=True)  # each photo's caption rows, for _xe_batches
        self._caption_rows = list(torch.split(order, torch.bincount(self.captions.image_index,
                                                                    minlength=len(self.train_split.records)).tolist()))
        self.weights = [dataset.weight for dataset in self.train_sets]
        self.scst = SelfCritical(self.train_split.records, self.model.vocab, config) if config.scst_epochs else None
        # what training runs forward through (DistributedDataParallel, compiled); the parameters, the optimizer
        # and what is saved belong to the unwrapped ``self.model.decoder`` and ``self.model.encoder``
        self.wrapped_decoder, self.wrapped_encoder = self._wrap(self.model.decoder), self._wrap(self.model.encoder)
        self.optimizer, self.scheduler = self._optimizer("xe")
        if resume:
            restored = train_state.restore(last, config, self.dist, self._optimizer)
            self.progress, self.optimizer, self.scheduler = restored
            log.info("resumed after epoch %d (phase %s, best %s %.4f)", self.progress.epoch, self.progress.phase,
                     config.select_metric, self.progress.best_score)
        else:  # feature extraction may or may not have drawn random numbers (cache hits): start afresh
            torch.manual_seed(config.seed + 1 + self.dist.rank)
        self.board = TensorBoard(self.out, self.progress.epoch) if self.dist.is_main else None

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def _features(self, records: list[ImageCaptions], owners: list[int], views: tuple[str, ...] = ("center",)) -> Split:
        """The records kept with their cached encoder features: ``(N, F)``, or ``(views, N, F)`` with augmentation;
        None when the encoder is fine-tuned. With ``skip_invalid`` images that cannot be decoded are left out.
        One cache serves every set: its rows are keyed by each file's bytes, wherever the file lives."""
        if self.config.finetune_encoder:
            return Split(records, torch.tensor(owners), None)
        paths, stacked = [r.path for r in records], list[torch.Tensor]()
        digests = file_digests(paths, self.dist.is_main)  # once for all views
        for view in views:
            cache = FeatureCache(self.config.feature_cache or cache_dir("features"), self.model.encoder, view)
            # the first view finds the images that cannot be decoded; later views get only the others
            features, encoded, unreadable = cache.get(paths, num_workers=self.config.num_workers, device=self.device,
                                                      dist=self.dist, digests=digests,
                                                      skip_invalid=self.config.skip_invalid and not stacked)
            log.info("features (%s): %d images, %d newly encoded, cache %s", view, len(records), encoded, cache.path)
            if unreadable:
                log.warning("skipped %d image(s) that cannot be read (--skip-invalid), e.g. %s", len(unreadable),
                            next(iter(unreadable.values())))
                kept = [i for i in range(len(records)) if i not in unreadable]
                if not kept:
                    raise DataError(f"none of the {len(records)} images can be read")
                records, paths = [records[i] for i in kept], [paths[i] for i in kept]
                digests, owners = [digests[i] for i in kept], [owners[i] for i in kept]
            stacked.append(features.to(self.device))
        return Split(records, torch.tensor(owners), stacked[0] if len(stacked) == 1 else torch.stack(stacked))

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel under torchrun; torch.compile on request."""
        if module is self.model.encoder and not self.config.finetune_encoder:
            return module
        if self.dist.enabled:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # torch.compile of a module returns a module (OptimizedModule); its annotation says only "a callable"
        return cast(nn.Module, torch.compile(module)) if self.config.compile else module

    # -------------------------------------------------------------------------------- optimisation
    def _steps_per_epoch(self) -> int:
        return len(self._xe_batches())

    def _xe_batches(self) -> list[torch.Tensor]:
        """This rank's caption rows of each cross-entropy step: ``batch_size`` shuffled captions; or, when the
        CNN is trained, all the captions of as many whole photos, so that each photo goes through it once."""
        if self.train_split.features is not None:
            return self._batches(self._epoch_rows(self._caption_sets()), self.config.batch_size)
        per_photo = len(self.captions.image_index) / max(1, len(self.train_split.records))
        photos = self._batches(self._epoch_rows(self.train_split.sets), max(1, round(self.config.batch_size / per_photo)))
        return [torch.cat([self._caption_rows[i] for i in batch.tolist()]) for batch in photos]

    def _caption_sets(self) -> torch.Tensor:
        """The training set of each caption."""
        return self.train_split.sets[self.captions.image_index]

    def _epoch_rows(self, sets: torch.Tensor) -> torch.Tensor:
        """The rows (captions or images) this epoch visits, each set's weighted; the same on every rank."""
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + self.progress.epoch)
        return weighted_rows(sets, self.weights, generator)

    def _optimizer(self, phase: str) -> tuple[torch.optim.Optimizer, LRScheduler]:
        config = self.config
        if phase == "scst":
            optimizer = torch.optim.Adam(self.model.decoder.parameters(), lr=config.scst_lr)
            return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        groups = [{"params": list(self.model.decoder.parameters()), "lr": config.lr}]
        if config.finetune_encoder:
            groups.append({"params": list(self.model.encoder.parameters()), "lr": config.encoder_lr})
        optimizer = torch.optim.Adam(groups, weight_decay=config.weight_decay)
        total = max(1, config.epochs * self._steps_per_epoch())

        def factor(step: int) -> float:
            if step < config.warmup_steps:
                return (step + 1) / config.warmup_steps
            if config.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # -------------------------------------------------------------------------------- epochs
    def run(self, stop_after_epoch: int | None = None) -> Path:
        """Train to the end (or until ``stop_after_epoch`` epochs are complete); return ``best/``.

        The phases run in order, each until its last epoch or until its patience is spent: cross-entropy
        epochs ``[0, epochs)``, then self-critical ones ``[epochs, epochs + scst_epochs)`` from the best
        cross-entropy checkpoint. A resumed run starts in the phase it was in."""
        config, progress = self.config, self.progress
        phases = [("xe", config.epochs), ("scst", config.epochs + config.scst_epochs)][:2 if config.scst_epochs else 1]
        if progress.phase == "scst":
            phases = phases[1:]
        if progress.epoch >= phases[-1][1] or (len(phases) == 1 and self._patience_spent()):
            log.info("this run is already finished (%d epochs done); nothing to resume", progress.epoch)
            phases = []
        for phase, last_epoch in phases:
            if phase != progress.phase:
                self._start_scst()
            while progress.epoch < last_epoch and not self._patience_spent():
                self._epoch()
                if stop_after_epoch is not None and progress.epoch >= stop_after_epoch:
                    return self._best()
            if self._patience_spent():
                self._say_stopped_early()
        return self._best()

    def _epoch(self) -> None:
        started = time.time()
        loss = self._scst_epoch() if self.progress.phase == "scst" else self._xe_epoch()
        scores, samples = self.dist.broadcast(self.validate() if self.dist.is_main else None)
        self._end_epoch(loss, scores, samples, time.time() - started)

    def _best(self) -> Path:
        log.info("best %s %.4f at epoch %d: %s", self.config.select_metric, self.progress.best_score,
                 self.progress.best_epoch, self.out / "best")
        return self.out / "best"

    def _patience_spent(self) -> bool:
        return self.progress.stale_epochs >= self.config.patience > 0

    def _say_stopped_early(self) -> None:
        log.info("%s stopped early after epoch %d: no better validation %s for %d epochs (patience); best was "
                 "epoch %d", "SCST" if self.progress.phase == "scst" else "cross-entropy", self.progress.epoch,
                 self.config.select_metric, self.config.patience, self.progress.best_epoch)

    def _start_scst(self) -> None:
        """Continue from the best cross-entropy model, with the SCST optimizer."""
        best = self.out / "best"
        if best.is_dir():
            if self.dist.is_main:
                shutil.copytree(best, self.out / "best-xe", dirs_exist_ok=True)
            weights = checkpoint.load_tensors(best / checkpoint.MODEL_FILE)
            self.model.decoder.load_state_dict({k: v.float() for k, v in weights.items()})
        self.progress.phase, self.progress.stale_epochs = "scst", 0
        self.progress.epoch = max(self.progress.epoch, self.config.epochs)
        self.optimizer, self.scheduler = self._optimizer("scst")
        log.info("SCST: %d epochs from %s", self.config.scst_epochs, best)

    def _batches(self, rows: torch.Tensor, global_size: int) -> list[torch.Tensor]:
        """This rank's share of each global batch of ``rows``; the union over ranks is one shuffled batch."""
        # the sampler needs only len() of its "dataset" of indices; torch's annotation asks for a Dataset
        sampler: DistributedSampler[int] = DistributedSampler(range(len(rows)),  # type: ignore[arg-type]
                                                              self.dist.world_size, self.dist.rank, shuffle=True,
                                                              seed=self.config.seed)
        sampler.set_epoch(self.progress.epoch)
        mine = rows[torch.tensor(list(sampler), dtype=torch.long)]
        size = max(1, global_size // self.dist.world_size)
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def _features_for(self, image_rows: torch.Tensor) -> torch.Tensor:
        features = self.train_split.features
        if features is not None and features.dim() == 3:  # augmented: a random view for each row
            views = torch.randint(len(features), (len(image_rows),))
            return features[views.to(features.device), image_rows.to(features.device)]
        if features is not None:
            return features[image_rows.to(features.device)]
        records = self.train_split.records
        photos, of_row = torch.unique(image_rows, return_inverse=True)  # each photo through the CNN once
        crops = AUGMENTATIONS[self.config.augment]  # one drawn for each photo, as a cached view is for each row
        picks = torch.randint(len(crops), (len(photos),)).tolist()
        pixels = torch.stack([self.model.encoder.pixels(records[i].path, crops[pick])
                              for i, pick in zip(photos.tolist(), picks)])
        layout = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        return self.wrapped_encoder(pixels.to(self.device, memory_format=layout))[of_row.to(self.device)]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1

    def _train_mode(self) -> None:
        self.model.train()
        self.model.encoder.eval()  # frozen CNN, or fine-tuned with BatchNorm statistics fixed

    def _progress_bar(self, batches, description: str):
        return tqdm(batches, desc=description, unit="batch", leave=False, disable=not self.dist.is_main)

    def _xe_epoch(self) -> float:
        """Cross-entropy with teacher forcing; the loss is summed over tokens and divided by the global batch's
        token count, so any number of processes takes the same step as one process with the whole batch."""
        self._train_mode()
        captions, total, count = self.captions, 0.0, 0
        ss_prob = self.config.scheduled_sampling * min(1.0, self.progress.epoch / max(1, self.config.epochs - 1))
        bar = self._progress_bar(self._xe_batches(), f"epoch {self.progress.epoch + 1}")
        for rows in bar:
            tokens, lengths = captions.tokens[rows], captions.lengths[rows]
            tokens = tokens[:, : int(lengths.max())].to(self.device)
            targets = tokens[:, 1:][tokens[:, 1:] != PAD_ID]
            tokens_in_batch = self.dist.all_sum(float(len(targets)))
            with self._autocast():
                features = self._features_for(captions.image_index[rows])
                logits = self.wrapped_decoder(features, tokens, lengths, ss_prob, valid_only=True)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.config.label_smoothing,
                                   reduction="sum")
            self._step(loss * self.dist.world_size / tokens_in_batch)  # DDP averages gradients over ranks
            total, count = total + loss.item() * self.dist.world_size / tokens_in_batch, count + 1
            bar.set_postfix(loss=f"{total / count:.3f}")
        return total / max(1, count)

    def _scst_epoch(self) -> float:
        """Self-critical sequence training (see :mod:`.scst`): captions are sampled without gradients, then one
        teacher-forced pass over them, with dropout off, gives the policy gradient (which DDP averages)."""
        assert self.scst is not None, "set up in __init__ whenever scst_epochs > 0"
        total, count = 0.0, 0
        images_per_batch = max(self.dist.world_size, self.config.scst_batch_size)
        batches = self._batches(self._epoch_rows(self.train_split.sets), images_per_batch)
        for rows in self._progress_bar(batches, f"SCST epoch {self.progress.epoch + 1}"):
            features = self._features_for(rows)
            self.model.eval()
            tokens, advantage, reward = self.scst.sample(self.model.decoder, features, rows.tolist())
            lengths = (tokens != PAD_ID).sum(1)
            with self._autocast(), dropout_off(self.model.decoder):
                repeated = features.repeat_interleave(self.scst.samples, 0)
                logits = self.wrapped_decoder(repeated, tokens, lengths, valid_only=True)
            self._step(policy_loss(logits, tokens, advantage.to(self.device)))
            total, count = total + reward, count + 1
        return -self.dist.all_sum(total / max(1, count)) / self.dist.world_size  # logged: minus mean CIDEr-D

    # -------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> tuple[dict[str, dict[str, float]], dict[str, list[tuple[str, str, str]]]]:
        """Caption the validation images with the checkpoint's decoding settings: each set's scores by name, and
        ``(file name, caption, a reference)`` of its first few photos (for TensorBoard)."""
        self.model.eval()
        split = self.val_split
        features = split.features
        if features is None:
            features = extract_features(self.model.encoder, [r.path for r in split.records],
                                        device=self.device, num_workers=self.config.num_workers, progress=False)
        captions = self.model.generate(features, batch_size=256)
        scores, samples = {}, {}
        for index, dataset in enumerate(self.val_sets):
            rows = torch.nonzero(split.sets == index).flatten().tolist()
            scores[dataset.name] = score_captions({i: captions[i][0].text for i in rows},
                                                  {i: split.records[i].captions for i in rows}, FAST_METRICS)
            samples[dataset.name] = [(split.records[i].path.name, captions[i][0].text, split.records[i].captions[0])
                                     for i in rows[:SAMPLE_PHOTOS]]
        return scores, samples

    def _selection(self, scores: dict[str, dict[str, float]]) -> dict[str, float]:
        """The scores that pick ``best/``: those of the ``select_set`` (the first by default) or, for ``mean``,
        each metric's mean over the sets."""
        if self.config.select_set == SELECT_MEAN:
            return {metric: sum(s[metric] for s in scores.values()) / len(scores) for metric in next(iter(scores.values()))}
        return scores[self.config.select_set or self.val_sets[0].name]

    def _end_epoch(self, loss: float, by_set: dict[str, dict[str, float]],
                   samples: dict[str, list[tuple[str, str, str]]], seconds: float) -> None:
        progress, config = self.progress, self.config
        progress.epoch += 1
        scores = self._selection(by_set)
        score = scores[config.select_metric]
        improved = score > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch, progress.stale_epochs = score, progress.epoch, 0
        else:
            progress.stale_epochs += 1
        entry = {"epoch": progress.epoch, "phase": progress.phase, "loss": round(loss, 5),
                 "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 1),
                 **{k: round(v, 5) for k, v in scores.items()}, "best": improved}
        if len(by_set) > 1:  # the top-level scores are the selection's; each set's own follow
            entry["sets"] = {name: {k: round(v, 5) for k, v in s.items()} for name, s in by_set.items()}
        progress.history.append(entry)
        # a collective: every rank takes part
        state_files = train_state.state_files(config, progress, self.optimizer, self.scheduler, self.dist)
        if self.dist.is_main:
            if improved:
                self.model.save_pretrained(self.out / "best", extra_files={
                    checkpoint.METRICS_FILE: lambda path: checkpoint.write_json(path, entry)})
            self.model.save_pretrained(self.out / "last", extra_files=state_files)
            try:
                write_log(self.out, progress.history, config.select_metric)
            except OSError as exc:
                raise OutputError(f"{self.out}: cannot write {LOG_FILE} ({exc.strerror or exc})") from None
            if self.board is not None:
                self.board.epoch(entry, by_set, samples)
        self.dist.barrier()
        each = "".join(f" | {name} {s.get(config.select_metric, float('nan')):.4f}" for name, s in by_set.items()
                       if len(by_set) > 1)
        log.info("epoch %d %s loss %.4f | BLEU-4 %.4f CIDEr-D %.4f%s%s | %.0fs", progress.epoch, progress.phase, loss,
                 scores.get("BLEU-4", float("nan")), scores.get("CIDEr-D", float("nan")),
                 " (best)" if improved else "", each, seconds)
        if scores.get("distinct_captions", 1.0) < COLLAPSE_THRESHOLD:
            log.warning("validation captions have collapsed: only %.0f%% of images get a distinct caption (the model "
                        "says the same thing for most photos); more data, more epochs or a lower learning rate may help",
                        100 * scores["distinct_captions"])


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None) -> Path:
    """Train a captioner as ``config`` says; returns the best checkpoint directory."""
    config.validate()
    dist = Distributed.setup(config.device)
    try:
        with claim_output(config, dist):
            trainer = Trainer(config, resume=resume, dist=dist)
            try:
                return trainer.run(stop_after_epoch=stop_after_epoch)
            finally:
                trainer.close()
    finally:
        dist.close()
