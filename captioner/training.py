"""Training: cached encoder features, teacher-forced LSTM training, validation by generation, SCST.

Reads top to bottom as the run does:
1. load and validate the annotations, build the vocabulary;
2. encode every image once through the feature cache (or, with ``finetune_encoder``, run the CNN
   per batch and train it too, at a lower learning rate);
3. train with cross-entropy and teacher forcing (Adam, gradient-norm clipping, dropout, label
   smoothing, optional scheduled sampling, a cosine learning-rate schedule);
4. after each epoch caption the validation images with the model's own decoding settings, score
   them with the coco-caption metrics, keep ``best/`` and ``last/`` checkpoints, stop early when the
   selection metric stops improving;
5. optionally continue with self-critical sequence training (SCST): sampled captions are rewarded
   by their CIDEr-D minus that of the greedy caption.
Every epoch rewrites ``log.jsonl`` and ``training.png``; ``last/`` carries the optimizer, scheduler
and random-number state, so ``resume`` continues exactly where the last complete epoch ended.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import reprlib
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from . import checkpoint
from .data import EncodedCaptions, ImageCaptions, encode_captions, load_captions
from .decoder import Decoder, DecoderConfig
from .decoding import GenerationConfig, sample_or_greedy
from .distributed import Distributed
from .encoder import BACKBONES, DEFAULT_ENCODER, VIEWS, Encoder, EncoderWeights
from .bounds import check_fields, check_options, option, option_like
from .errors import CheckpointError, ConfigError, DataError, OutputError
from .features import FeatureCache, default_cache_dir, extract_features, file_digests
from .metrics import FAST_METRICS, CiderD, score_captions
from .model import Captioner
from .vocab import END, PAD_ID, START_ID, Vocabulary, tokenize

log = logging.getLogger(__name__)

TRAINER_FILE, STATE_FILE = "trainer.json", "training_state.safetensors"
AUGMENTATIONS = {"none": ("center",), "flip": ("center", "flip"), "tencrop": VIEWS}
LOG_FILE, PLOT_FILE, LOCK_FILE = "log.jsonl", "training.png", ".lock"
COLLAPSE_THRESHOLD = 0.1  # distinct validation captions per image below which training warns


@dataclass
class TrainConfig:
    """Every training option; the CLI flags and config files fill this one dataclass."""

    images: str = option("", "folder of training images (and validation images unless --val-images)")
    train_captions: str = option("", "training annotations: COCO captions JSON or a Karpathy-split file")
    val_captions: str = option("", "validation annotations (default: the 'val' split of a Karpathy file)")
    val_images: str = option("", "folder of validation images, if not --images")
    out: str = option("runs/captioner", "output folder: best/, last/, log.jsonl, training.png")
    encoder: str = option(DEFAULT_ENCODER, "CNN backbone", choices=tuple(BACKBONES))
    encoder_weights: str = option("", "encoder weights: empty for pretrained ImageNet, a file path, or 'none'")
    embed_size: int = option_like(DecoderConfig, "embed_size", "word and image embedding size")
    hidden_size: int = option_like(DecoderConfig, "hidden_size", "LSTM hidden size")
    num_layers: int = option_like(DecoderConfig, "num_layers", "LSTM layers")
    dropout: float = option_like(DecoderConfig, "dropout", "dropout on LSTM outputs (and between LSTM layers)")
    input_dropout: float = option_like(DecoderConfig, "input_dropout")
    min_word_count: int = option(5, "words seen fewer times become <unk>", range=(1, 1000000000))
    max_caption_length: int = option(30, "training captions are cut to this many words (the cut count is logged)", range=(1, 100))
    epochs: int = option(20, "cross-entropy epochs (an upper bound when early stopping)", range=(0, 10000))
    batch_size: int = option(128, "captions per cross-entropy step (under torchrun: the global batch)", range=(1, 65536))
    lr: float = option(4e-4, "Adam learning rate for the decoder", range=(0, 1))
    weight_decay: float = option(0.0, "Adam weight decay", range=(0, 1))
    lr_schedule: str = option("cosine", "learning-rate schedule over the cross-entropy epochs",
                               choices=("cosine", "constant"))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", range=(0, 1000000000))
    grad_clip: float = option(5.0, "clip the gradient norm to this (0 = off)", range=(0, 1000000.0))
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss")
    scheduled_sampling: float = option(0.0, "final probability of feeding back the model's own word (0 = off)")
    patience: int = option(5, "stop a phase after this many epochs without a better validation score", range=(0, 10000))
    select_metric: str = option("CIDEr-D", "validation metric that selects the best checkpoint",
                                 choices=("CIDEr-D", "BLEU-4", "ROUGE-L", "BLEU-1"))
    beam_size: int = option_like(GenerationConfig, "beam_size", "beam size for validation and the checkpoint's "
                                                                "default decoding")
    length_penalty: float = option_like(GenerationConfig, "length_penalty", "length penalty for validation and the "
                                                                          "checkpoint's default decoding")
    max_length: int = option_like(GenerationConfig, "max_length", "longest generated caption in words")
    finetune_encoder: bool = option(False, "train the CNN too (no feature cache; slow without a GPU)")
    encoder_lr: float = option(1e-5, "learning rate for the CNN with --finetune-encoder", range=(0, 1))
    scst_epochs: int = option(0, "self-critical sequence training epochs after cross-entropy (0 = off)", range=(0, 10000))
    scst_lr: float = option(2e-5, "learning rate during SCST", range=(0, 1))
    scst_samples: int = option(5, "sampled captions per image during SCST", range=(1, 64))
    scst_batch_size: int = option(16, "images per SCST step (each with scst_samples sampled captions)", range=(1, 65536))
    scst_baseline: str = option("mean", "SCST reward baseline: the mean reward of the image's other samples, or the "
                                 "greedy caption's reward (Rennie et al.; unstable in our runs)", choices=("mean", "greedy"))
    seed: int = option(0, "random seed (data order, initialisation, dropout)", range=(0, 9223372036854775807))
    device: str = option("auto", "auto, cpu, cuda, cuda:1, mps (under torchrun: each rank's own GPU)")
    precision: str = option("fp32", "bf16 runs the forward passes under bfloat16 autocast (for GPUs)",
                             choices=("fp32", "bf16"))
    compile: bool = option(False, "torch.compile the trained modules (for GPUs; compiling takes a while)")
    num_workers: int = option(0, "image-loading worker processes", range=(0, 256))
    feature_cache: str = option("", f"feature cache folder (default {default_cache_dir()})")
    augment: str = option("none", "extra cached views of each training image, one picked at random per caption: "
                           "flip (mirror image) or tencrop (corner crops and mirrors, torchvision's TenCrop)",
                           choices=tuple(AUGMENTATIONS))
    skip_invalid: bool = option(False, "train on the valid items of a flawed annotation file instead of stopping")

    # Options a resumed run may change: nothing already learnt depends on them (the run folder may move too).
    RESUMABLE = ("out", "feature_cache", "epochs", "scst_epochs", "scst_lr", "scst_samples", "scst_batch_size",
                 "scst_baseline", "patience", "device", "num_workers", "precision", "compile")
    def validate(self) -> None:
        """Types and ranges (from each field's metadata, like every option dataclass), then combinations."""
        check_fields(self, ConfigError)
        for name in ("images", "train_captions"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        if self.epochs + self.scst_epochs < 1:
            raise ConfigError("nothing to train: epochs and scst_epochs are both 0")
        if not all(0 <= v < 1 for v in (self.dropout, self.input_dropout, self.label_smoothing)) or \
                not 0 <= self.scheduled_sampling <= 1:
            raise ConfigError("dropouts and label_smoothing must be in [0, 1), scheduled_sampling in [0, 1]")
        if self.lr <= 0 or self.scst_lr <= 0 or self.encoder_lr <= 0:
            raise ConfigError("learning rates must be positive")
        if self.scst_baseline == "mean" and self.scst_samples < 2:
            raise ConfigError("the mean SCST baseline needs scst_samples of 2 or more")
        if self.finetune_encoder and self.scst_epochs:
            raise ConfigError("--scst-epochs works from cached features; it cannot be combined with --finetune-encoder")

    def generation(self) -> GenerationConfig:
        return GenerationConfig(beam_size=self.beam_size, length_penalty=self.length_penalty,
                                max_length=self.max_length)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        normalised = {key.replace("-", "_"): value for key, value in data.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
        check_options(cls, normalised, ConfigError, source)
        return cls(**normalised)



# ------------------------------------------------------------------------------------------------ data
@dataclass
class Split:
    """One split ready for training: its images, their features (or None) and encoded captions."""

    records: list[ImageCaptions]
    features: torch.Tensor | None
    captions: EncodedCaptions | None = None

    def references(self) -> dict[int, list[str]]:
        return {i: r.captions for i, r in enumerate(self.records)}


def load_splits(config: TrainConfig) -> tuple[list[ImageCaptions], list[ImageCaptions]]:
    val_images = config.val_images or config.images
    train, report = load_captions(config.train_captions, config.images, "train", config.skip_invalid)
    _report_skipped(config.train_captions, report)
    val, report = load_captions(config.val_captions or config.train_captions, val_images, "val", config.skip_invalid)
    _report_skipped(config.val_captions or config.train_captions, report)
    log.info("data: %d training images (%d captions), %d validation images", len(train),
             sum(len(r.captions) for r in train), len(val))
    return train, val


def _report_skipped(path: str, report) -> None:
    if report.skipped:
        log.warning("%s: skipped %d invalid item(s) (--skip-invalid), e.g. %s", path, len(report.skipped),
                    report.skipped[0])


# ------------------------------------------------------------------------------------------------ state
_PROGRESS_TYPES = {"int": int, "float": (int, float), "str": str}


@dataclass
class Progress:
    """What ``trainer.json`` records between epochs."""

    epoch: int = 0  # completed epochs, both phases
    step: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    stale_epochs: int = 0
    phase: str = "xe"
    history: list[dict] = field(default_factory=list)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, saved: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in saved["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


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
        train_records, val_records = load_splits(config)
        last = checkpoint.recover(self.out / "last")
        self.progress = Progress()
        if resume:
            if not last.is_dir():
                raise CheckpointError(f"{last}: nothing to resume (no last checkpoint in {self.out})")
            self.model = Captioner.from_pretrained(last, device=self.device)
        else:
            vocab = Vocabulary.build((c for r in train_records for c in r.captions), config.min_word_count)
            encoder = Encoder.pretrained(config.encoder, config.encoder_weights or None)
            decoder = Decoder(DecoderConfig(encoder.config.feature_size, len(vocab), config.embed_size,
                                            config.hidden_size, config.num_layers, config.dropout,
                                            config.input_dropout))
            self.model = Captioner(encoder, decoder, vocab, config.generation()).to(self.device)
            if config.finetune_encoder:
                self.model.encoder.config.weights = EncoderWeights("fine-tuned")
        log.info("vocabulary: %d words; encoder %s (%s); %d process(es) on %s", len(self.model.vocab),
                 self.model.encoder.config.name, self.model.encoder.config.weights, self.dist.world_size,
                 self.device)
        self.train = Split(*self._features(train_records, AUGMENTATIONS[config.augment]))
        self.train.captions = encode_captions(self.train.records, self.model.vocab, config.max_caption_length)
        if self.train.captions.truncated:
            log.info("%d training captions were cut to %d words", self.train.captions.truncated,
                     config.max_caption_length)
        self.val = Split(*self._features(val_records))
        self.decoder, self.encoder = self._wrap(self.model.decoder), self._wrap(self.model.encoder)
        self.optimizer, self.scheduler = self._optimizer("xe")
        if resume:
            self._load_training_state(last)
        else:  # feature extraction may or may not have drawn random numbers (cache hits): start afresh
            torch.manual_seed(config.seed + 1 + self.dist.rank)

    def _features(self, records: list[ImageCaptions],
                  views: tuple[str, ...] = ("center",)) -> tuple[list[ImageCaptions], torch.Tensor | None]:
        """The records kept and their cached encoder features: ``(N, F)``, or ``(views, N, F)`` with augmentation;
        None when the encoder is fine-tuned. With ``skip_invalid`` images that cannot be decoded are left out."""
        if self.config.finetune_encoder:
            return records, None
        paths, stacked = [r.path for r in records], []
        digests = file_digests(paths, self.dist.is_main)  # once for all views
        for view in views:
            cache = FeatureCache(self.config.feature_cache or default_cache_dir(), self.model.encoder, view)
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
                records, paths, digests = ([items[i] for i in kept] for items in (records, paths, digests))
            stacked.append(features.to(self.device))
        return records, stacked[0] if len(stacked) == 1 else torch.stack(stacked)

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel under torchrun; torch.compile on request."""
        if module is self.model.encoder and not self.config.finetune_encoder:
            return module
        if self.dist.enabled:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(module) if self.config.compile else module

    # -------------------------------------------------------------------------------- optimisation
    def _steps_per_epoch(self) -> int:
        return math.ceil(len(self.train.captions) / self.config.batch_size)

    def _optimizer(self, phase: str):
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

    def _training_state_files(self) -> dict:
        """Files that join the model in ``last/``: optimizer, schedule, progress, every rank's RNG state."""
        tensors, optimizer_json = _flatten_optimizer(self.optimizer)
        for rank, states in enumerate(self.dist.gather(_rng_states())):
            tensors.update({f"rng.{rank}.{name}": state for name, state in states.items()})
        trainer = {"config": asdict(self.config), "progress": asdict(self.progress), "optimizer": optimizer_json,
                   "scheduler": self.scheduler.state_dict(), "world_size": self.dist.world_size}
        return {STATE_FILE: lambda path: checkpoint.save_tensors(tensors, path),
                TRAINER_FILE: lambda path: checkpoint.write_json(path, trainer)}

    def _load_training_state(self, last: Path) -> None:
        saved = read_trainer_file(last)
        previous = TrainConfig.from_dict(saved["config"])
        changed = [f.name for f in fields(TrainConfig)
                   if f.name not in TrainConfig.RESUMABLE and getattr(previous, f.name) != getattr(self.config, f.name)]
        if changed:
            raise ConfigError(f"cannot resume with changed option(s) {', '.join(changed)}; "
                              f"only {', '.join(TrainConfig.RESUMABLE)} may change")
        tensors = checkpoint.load_tensors(last / STATE_FILE)
        try:
            self.progress = Progress(**saved["progress"])
            for item in fields(Progress):
                if not isinstance(getattr(self.progress, item.name), _PROGRESS_TYPES.get(item.type, list)):
                    raise TypeError(f"progress.{item.name} has the wrong type")
            self.optimizer, self.scheduler = self._optimizer(self.progress.phase)
            _restore_optimizer(self.optimizer, tensors, saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            rank = self.dist.rank if saved.get("world_size", 1) == self.dist.world_size else 0
            prefix = f"rng.{rank}."
            _set_rng_states({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, self.device)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise CheckpointError(f"{last}: inconsistent training state ({type(exc).__name__}: "
                                  f"{reprlib.repr(str(exc).partition(chr(10))[0])})") from None
        log.info("resumed after epoch %d (phase %s, best %s %.4f)", self.progress.epoch, self.progress.phase,
                 self.config.select_metric, self.progress.best_score)

    # -------------------------------------------------------------------------------- epochs
    def run(self, stop_after_epoch: int | None = None) -> Path:
        """Train to the end (or until ``stop_after_epoch`` epochs are complete); return ``best/``."""
        config, progress = self.config, self.progress
        total = config.epochs + config.scst_epochs
        if progress.epoch >= total or (self._patience_spent() and (progress.phase == "scst" or not config.scst_epochs)):
            log.info("this run is already finished (%d epochs done); nothing to resume", progress.epoch)
        while progress.epoch < total:
            if progress.phase == "xe" and (progress.epoch >= config.epochs or self._patience_spent()):
                if self._patience_spent():
                    self._say_stopped_early()
                if not config.scst_epochs:
                    break
                self._start_scst()
            if progress.phase == "scst" and self._patience_spent():
                self._say_stopped_early()
                break
            started = time.time()
            loss = self._scst_epoch() if progress.phase == "scst" else self._xe_epoch()
            scores = self.dist.broadcast(self.validate() if self.dist.is_main else None)
            self._end_epoch(loss, scores, time.time() - started)
            if stop_after_epoch is not None and progress.epoch >= stop_after_epoch:
                break
        log.info("best %s %.4f at epoch %d: %s", config.select_metric, progress.best_score, progress.best_epoch,
                 self.out / "best")
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

    def _batches(self, count: int, global_size: int) -> list[torch.Tensor]:
        """This rank's share of each global batch; the union over ranks is one shuffled batch."""
        sampler = DistributedSampler(range(count), self.dist.world_size, self.dist.rank, shuffle=True,
                                     seed=self.config.seed)
        sampler.set_epoch(self.progress.epoch)
        mine = torch.tensor(list(sampler))
        size = max(1, global_size // self.dist.world_size)
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def _features_for(self, image_rows: torch.Tensor) -> torch.Tensor:
        features = self.train.features
        if features is not None and features.dim() == 3:  # augmented: a random view for each row
            views = torch.randint(len(features), (len(image_rows),))
            return features[views.to(features.device), image_rows.to(features.device)]
        if features is not None:
            return features[image_rows.to(features.device)]
        records = self.train.records
        pixels = torch.stack([self.model.encoder.pixels(records[i].path) for i in image_rows.tolist()])
        layout = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        return self.encoder(pixels.to(self.device, memory_format=layout))

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
        captions, total, count = self.train.captions, 0.0, 0
        ss_prob = self.config.scheduled_sampling * min(1.0, self.progress.epoch / max(1, self.config.epochs - 1))
        bar = self._progress_bar(self._batches(len(captions), self.config.batch_size), f"epoch {self.progress.epoch + 1}")
        for rows in bar:
            tokens, lengths = captions.tokens[rows], captions.lengths[rows]
            tokens = tokens[:, : int(lengths.max())].to(self.device)
            targets = tokens[:, 1:][tokens[:, 1:] != PAD_ID]
            tokens_in_batch = self.dist.all_sum(float(len(targets)))
            with self._autocast():
                features = self._features_for(captions.image_index[rows])
                logits = self.decoder(features, tokens, lengths, ss_prob, valid_only=True)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.config.label_smoothing,
                                   reduction="sum")
            self._step(loss * self.dist.world_size / tokens_in_batch)  # DDP averages gradients over ranks
            total, count = total + loss.item() * self.dist.world_size / tokens_in_batch, count + 1
            bar.set_postfix(loss=f"{total / count:.3f}")
        return total / max(1, count)

    def _scst_epoch(self) -> float:
        """Self-critical sequence training: the reward of each sampled caption is its CIDEr-D minus a baseline,
        the mean CIDEr-D of the image's other samples (default) or that of its greedy caption.

        Measured on Flickr8k from the same cross-entropy model: with the greedy baseline nearly every sample
        scores below the greedy caption, the constant negative advantage swamps the signal, and within a few
        hundred steps the greedy caption's training CIDEr-D fell from 0.59 to 0.15; with the mean baseline
        it rose to 0.63 and the samples' from 0.22 to 0.38 (Luo 2020 reports the same preference).

        Captions are sampled (and the greedy baseline decoded) without gradients; the policy gradient then
        comes from one teacher-forced pass over the sampled captions, which also lets DDP average it. Dropout
        stays off throughout, so that pass scores exactly the policy that drew the samples.
        """
        if not hasattr(self, "_cider"):
            # <end> counts as a word on both sides, so a caption cut off mid-phrase ("a dog in the") cannot match the
            # references' endings: without it SCST learns to stop early.
            refs = [[tokenize(c) + [END] for c in r.captions] for r in self.train.records]
            self._cider = CiderD(refs)
            self._cider_refs = [self._cider.prepare_references(r) for r in refs]
        samples = self.config.scst_samples
        images_per_batch = max(self.dist.world_size, self.config.scst_batch_size)
        sample_config = GenerationConfig(strategy="sample", num_return_sequences=samples, max_length=self.config.max_length)
        greedy_config = GenerationConfig(strategy="greedy", max_length=self.config.max_length)
        total, count = 0.0, 0
        batches = self._batches(len(self.train.records), images_per_batch)
        for rows in self._progress_bar(batches, f"SCST epoch {self.progress.epoch + 1}"):
            features = self._features_for(rows)
            self.model.eval()
            images = rows.tolist()
            with torch.no_grad():
                sampled = sample_or_greedy(self.model.decoder, features, sample_config).tokens
                if self.config.scst_baseline == "greedy":
                    greedy = sample_or_greedy(self.model.decoder, features, greedy_config).tokens[:, 0]
            rewards = torch.tensor([[self._reward(s, i) for s in row] for row, i in zip(sampled, images)])
            if self.config.scst_baseline == "greedy":
                baseline = torch.tensor([self._reward(g, i) for g, i in zip(greedy, images)])[:, None]
            else:
                baseline = (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)
            advantage = (rewards - baseline).flatten().to(self.device)
            tokens = torch.cat([torch.full_like(sampled[:, :, :1], START_ID), sampled], 2).flatten(0, 1)
            lengths = (tokens != PAD_ID).sum(1)
            valid = tokens[:, 1:] != PAD_ID
            with self._autocast(), dropout_off(self.model.decoder):
                logits = self.decoder(features.repeat_interleave(samples, 0), tokens, lengths, valid_only=True)
            log_probs = F.log_softmax(logits.float(), -1).gather(1, tokens[:, 1:][valid][:, None])[:, 0]
            log_likelihood = log_probs.new_zeros(len(tokens)).index_add(0, valid.nonzero()[:, 0], log_probs)
            self._step(-(advantage * log_likelihood).mean())
            total, count = total + rewards.mean().item(), count + 1
        return -self.dist.all_sum(total / max(1, count)) / self.dist.world_size  # logged: minus mean CIDEr-D

    def _reward(self, ids: torch.Tensor, image: int) -> float:
        return self._cider.score(self.model.vocab.tokens(ids.tolist()) + [END], self._cider_refs[image])

    # -------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Caption the validation images with the checkpoint's decoding settings and score them."""
        self.model.eval()
        features = self.val.features
        if features is None:
            features = extract_features(self.model.encoder, [r.path for r in self.val.records], device=self.device,
                                        num_workers=self.config.num_workers, progress=False)
        captions = self.model.generate(features, batch_size=256)
        predictions = {i: c[0].text for i, c in enumerate(captions)}
        return score_captions(predictions, self.val.references(), FAST_METRICS)

    def _end_epoch(self, loss: float, scores: dict[str, float], seconds: float) -> None:
        progress, config = self.progress, self.config
        progress.epoch += 1
        score = scores[config.select_metric]
        improved = score > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch, progress.stale_epochs = score, progress.epoch, 0
        else:
            progress.stale_epochs += 1
        entry = {"epoch": progress.epoch, "phase": progress.phase, "loss": round(loss, 5),
                 "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 1),
                 **{k: round(v, 5) for k, v in scores.items()}, "best": improved}
        progress.history.append(entry)
        state_files = self._training_state_files()  # a collective: every rank takes part
        if self.dist.is_main:
            if improved:
                self.model.save_pretrained(self.out / "best", extra_files={
                    "metrics.json": lambda path: checkpoint.write_json(path, entry)})
            self.model.save_pretrained(self.out / "last", extra_files=state_files)
            try:
                _write_log(self.out, progress.history, config.select_metric)
            except OSError as exc:
                raise OutputError(f"{self.out}: cannot write {LOG_FILE} ({exc.strerror or exc})") from None
        self.dist.barrier()
        log.info("epoch %d %s loss %.4f | BLEU-4 %.4f CIDEr-D %.4f%s | %.0fs", progress.epoch, progress.phase, loss,
                 scores.get("BLEU-4", float("nan")), scores.get("CIDEr-D", float("nan")),
                 " (best)" if improved else "", seconds)
        if scores.get("distinct_captions", 1.0) < COLLAPSE_THRESHOLD:
            log.warning("validation captions have collapsed: only %.0f%% of images get a distinct caption (the model "
                        "says the same thing for most photos); more data, more epochs or a lower learning rate may help",
                        100 * scores["distinct_captions"])


@contextmanager
def dropout_off(module: nn.Module):
    """Training mode with every dropout probability at zero: the forward pass is exactly the eval-mode policy,
    while cuDNN's LSTM backward, which refuses modules in eval mode, still runs."""
    dropouts = [(m, "p" if isinstance(m, nn.Dropout) else "dropout") for m in module.modules()
                if isinstance(m, (nn.Dropout, nn.RNNBase))]
    saved = [getattr(m, name) for m, name in dropouts]
    for m, name in dropouts:
        setattr(m, name, 0.0)
    module.train()
    try:
        yield
    finally:
        for (m, name), value in zip(dropouts, saved):
            setattr(m, name, value)


def read_trainer_file(last: Path) -> dict:
    """``last/trainer.json``: the options of the interrupted run, checked like a config file, and its state."""
    trainer_file = last / TRAINER_FILE
    saved = checkpoint.read_json(trainer_file)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"{trainer_file}: no 'config' object")
    TrainConfig.from_dict(saved["config"], str(trainer_file))
    return saved


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"])


def _write_log(out: Path, history: list[dict], metric: str) -> None:
    """Rewrite log.jsonl and training.png from the whole history (so a resumed run has one log)."""
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / f".{LOG_FILE}.tmp"
    temporary.write_text("".join(json.dumps(entry) + "\n" for entry in history), encoding="utf-8")
    temporary.replace(out / LOG_FILE)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [e["loss"] for e in history], marker="o")
    scst = any(e["phase"] == "scst" for e in history)
    left.set(title="training loss" + (" (SCST epochs: minus mean reward)" if scst else ""), xlabel="epoch")
    for name in dict.fromkeys(["BLEU-4", "CIDEr-D", metric]):
        right.plot(epochs, [e.get(name, float("nan")) for e in history], marker="o", label=name)
    best = max((e for e in history if e.get("best")), key=lambda e: e["epoch"], default=None)
    if best is not None:
        right.axvline(best["epoch"], color="grey", linestyle="--", label=f"best (epoch {best['epoch']})")
    right.set(title="validation", xlabel="epoch")
    right.legend()
    figure.tight_layout()
    figure.savefig(out / PLOT_FILE, dpi=100)
    plt.close(figure)


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None) -> Path:
    """Train a captioner as ``config`` says; returns the best checkpoint directory."""
    config.validate()
    dist = Distributed.setup(config.device)
    try:
        with claim_output(config, dist):
            return Trainer(config, resume=resume, dist=dist).run(stop_after_epoch=stop_after_epoch)
    finally:
        dist.close()


@contextmanager
def claim_output(config: TrainConfig, dist: Distributed) -> Iterator[None]:
    """Hold ``--out`` for one run: its folders must be writable, and no other training may write to it.

    Checked before any work, so a read-only or full disk, ``--out`` naming a file, or a second run with
    the same ``--out`` fails at once, not after an epoch. Rank 0 checks; every rank raises its error.
    """
    out, lock, problem = Path(config.out), None, None
    if dist.is_main:
        folders = {"--out": out}
        if not config.finetune_encoder:
            folders["--feature-cache"] = Path(config.feature_cache or default_cache_dir())
        try:
            for flag, folder in folders.items():
                checkpoint.check_writable(folder, flag)
            lock = _lock(out)
        except OutputError as exc:
            problem = str(exc)
        except OSError as exc:  # the lock itself, on a file system without locks
            problem = f"--out {out}: cannot lock {LOCK_FILE} ({exc.strerror or exc})"
    problem = dist.broadcast(problem)
    if problem:
        raise OutputError(problem)
    try:
        yield
    finally:
        if lock is not None:
            os.close(lock)


def _lock(out: Path) -> int:
    """An exclusive lock on ``out/.lock``, which holds our pid; the kernel releases it when the process
    ends, however it ends, so a killed run never leaves ``--out`` locked."""
    descriptor = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode("ascii", "replace").strip()
        os.close(descriptor)
        raise OutputError(f"--out {out}: another training (pid {holder if holder.isdigit() else 'unknown'}) is "
                          "writing there; wait for it to finish or choose another --out") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor
