"""Training: the loop of one run, from annotations to ``best/``; nanoGPT-plain, top to bottom as the run goes.

1. load and validate the annotations, build the vocabulary (options: :mod:`.config`; data: :mod:`.data`);
2. encode every image once through the feature cache (or, with ``finetune_encoder``, run the CNN
   per batch and train it too, at a lower learning rate);
3. train with cross-entropy and teacher forcing (Adam, gradient-norm clipping, dropout, label
   smoothing, optional scheduled sampling, a cosine learning-rate schedule: :mod:`.optim`);
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

:func:`prepare` builds a run step by step (each step a function of :mod:`.data`, :mod:`.model`,
:mod:`.optim`, :mod:`.state`); :class:`Trainer` holds what the loop changes and runs the epochs.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from .. import checkpoint
from ..data.annotations import EncodedCaptions, encode_captions
from ..data.vocab import PAD_ID
from ..distributed import Distributed
from ..errors import ConfigError, OutputError
from ..metrics import FAST_METRICS, score_captions
from ..models.captioner import Captioner
from . import state as train_state
from .config import AUGMENTATIONS, SELECT_MEAN, Dataset, TrainConfig
from .data import Batches, Split, encode_split, load_sets
from .features import extract_features
from .model import start_model, wrap
from .optim import make_optimizer
from .run_folder import LOG_FILE, claim_output, write_log
from .scst import SelfCritical, dropout_off, policy_loss
from .state import Progress
from .tensorboard import SAMPLE_PHOTOS, TensorBoard

log = logging.getLogger(__name__)

COLLAPSE_THRESHOLD = 0.1  # distinct validation captions per image below which training warns
LOSS_READ_EVERY = 25  # steps between reads of the running loss for the progress bar (each read is a GPU sync)


def selection(scores: dict[str, dict[str, float]], select_set: str) -> dict[str, float]:
    """The scores that pick ``best/`` from each validation set's (in the sets' order): those of ``select_set``
    (the first set when empty) or, for ``mean``, each metric's mean over the sets."""
    if select_set == SELECT_MEAN:
        return {metric: sum(s[metric] for s in scores.values()) / len(scores) for metric in next(iter(scores.values()))}
    return scores[select_set or next(iter(scores))]


@dataclass(eq=False)
class Trainer:
    """What the loop of one run (one rank of it under torchrun) reads and changes: the model, what training runs
    it forward through, the data, the optimizer, its schedule and the progress. Built by :func:`prepare`."""

    config: TrainConfig
    dist: Distributed
    model: Captioner
    # what training runs forward through (DistributedDataParallel, compiled); the parameters, the optimizer
    # and what is saved belong to the unwrapped ``model.decoder`` and ``model.encoder``
    wrapped_decoder: nn.Module
    wrapped_encoder: nn.Module
    train_split: Split
    captions: EncodedCaptions  # of the training split's records
    batches: Batches
    val_split: Split
    val_sets: list[Dataset]
    scst: SelfCritical | None
    optimizer_of: Callable[[str], tuple[Optimizer, LRScheduler]]  # a phase's optimizer and schedule, new
    optimizer: Optimizer
    scheduler: LRScheduler
    progress: Progress
    board: TensorBoard | None

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

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
        self.optimizer, self.scheduler = self.optimizer_of("scst")
        log.info("SCST: %d epochs from %s", self.config.scst_epochs, best)

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
        captions, count = self.captions, 0
        ss_prob = self.config.scheduled_sampling * min(1.0, self.progress.epoch / max(1, self.config.epochs - 1))
        batches = self.batches.xe(self.progress.epoch, self.config.batch_size,
                                  whole_photos=self.train_split.features is None)
        bar = self._progress_bar(batches, f"epoch {self.progress.epoch + 1}")
        # the loss stays on the device: read (a GPU sync) every LOSS_READ_EVERY steps and once an epoch, as nanoGPT
        total = torch.zeros((), dtype=torch.float32 if self.device.type == "mps" else torch.float64, device=self.device)
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
            total += loss.detach().to(total.dtype) * self.dist.world_size / tokens_in_batch
            count += 1
            if count % LOSS_READ_EVERY == 0:
                bar.set_postfix(loss=f"{total.item() / count:.3f}")
        return total.item() / max(1, count)

    def _scst_epoch(self) -> float:
        """Self-critical sequence training (see :mod:`.scst`): captions are sampled without gradients, then one
        teacher-forced pass over them, with dropout off, gives the policy gradient (which DDP averages)."""
        assert self.scst is not None, "set up by prepare() whenever scst_epochs > 0"
        total, count = 0.0, 0
        images_per_batch = max(self.dist.world_size, self.config.scst_batch_size)
        batches = self.batches.photos(self.progress.epoch, images_per_batch)
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

    def _end_epoch(self, loss: float, by_set: dict[str, dict[str, float]],
                   samples: dict[str, list[tuple[str, str, str]]], seconds: float) -> None:
        progress, config = self.progress, self.config
        progress.epoch += 1
        scores = selection(by_set, config.select_set)
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



def prepare(config: TrainConfig, resume: bool = False, dist: Distributed | None = None) -> Trainer:
    """Everything a run needs before its first step, in order: data, vocabulary and model, features, batches,
    optimizer, the state of ``last/`` on ``resume``, and the TensorBoard writer."""
    config.validate()
    dist = dist or Distributed.setup(config.device)
    if config.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {dist.world_size} processes")
    if not dist.is_main:
        log.setLevel(logging.WARNING)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    train_sets, val_sets = config.datasets()
    train_records, train_owners = load_sets(train_sets, "train", config.skip_invalid)
    val_records, val_owners = load_sets(val_sets, "val", config.skip_invalid)
    last = checkpoint.recover(out / "last")
    model = start_model(config, train_records, dist.device, resume_from=last if resume else None)
    log.info("vocabulary: %d words; encoder %s (%s); %d process(es) on %s", len(model.vocab),
             model.encoder.config.name, model.encoder.config.weights, dist.world_size, dist.device)

    train_split = encode_split(config, model.encoder, dist, train_records, train_owners, AUGMENTATIONS[config.augment])
    captions = encode_captions(train_split.records, model.vocab, config.max_caption_length)
    if captions.truncated:
        log.info("%d training captions were cut to %d words", captions.truncated, config.max_caption_length)
    val_split = encode_split(config, model.encoder, dist, val_records, val_owners)
    batches = Batches(train_split.sets, captions.image_index, [d.weight for d in train_sets], config.seed,
                      dist.world_size, dist.rank)
    scst = SelfCritical(train_split.records, model.vocab, config) if config.scst_epochs else None

    wrapped_decoder = wrap(model.decoder, config, dist)
    wrapped_encoder = wrap(model.encoder, config, dist) if config.finetune_encoder else model.encoder
    steps_per_epoch = len(batches.xe(0, config.batch_size, whole_photos=train_split.features is None))

    def optimizer_of(phase: str) -> tuple[Optimizer, LRScheduler]:
        return make_optimizer(config, model, phase, steps_per_epoch)

    optimizer, scheduler = optimizer_of("xe")
    progress = Progress()
    if resume:
        progress, optimizer, scheduler = train_state.restore(last, config, dist, optimizer_of)
        log.info("resumed after epoch %d (phase %s, best %s %.4f)", progress.epoch, progress.phase,
                 config.select_metric, progress.best_score)
    else:  # feature extraction may or may not have drawn random numbers (cache hits): start afresh
        torch.manual_seed(config.seed + 1 + dist.rank)
    board = TensorBoard(out, progress.epoch) if dist.is_main else None
    return Trainer(config, dist, model, wrapped_decoder, wrapped_encoder, train_split, captions, batches, val_split,
                   val_sets, scst, optimizer_of, optimizer, scheduler, progress, board)


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None) -> Path:
    """Train a captioner as ``config`` says; returns the best checkpoint directory."""
    config.validate()
    dist = Distributed.setup(config.device)
    try:
        with claim_output(config, dist):
            trainer = prepare(config, resume=resume, dist=dist)
            try:
                return trainer.run(stop_after_epoch=stop_after_epoch)
            finally:
                trainer.close()
    finally:
        dist.close()
