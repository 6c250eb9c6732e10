"""Every training option in one dataclass, :class:`TrainConfig`, checked before any work.

The CLI (flags, ``--config`` files, ``--resume``'s saved options) needs only this module; the
decoder's and decoding's options take their defaults and bounds from their own dataclasses.
A run trains on one or several :class:`Dataset` s (a captions file and its images folder each) and
validates on one or several; ``select_set`` says which validation set's score picks ``best/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..bounds import check_fields, check_object, from_dict, option, option_like
from ..errors import ConfigError
from ..generation.config import GenerationConfig
from ..models.config import BACKBONE_NAMES, DEFAULT_ENCODER, VIEWS, DecoderConfig
from ..runtime import cache_dir

AUGMENTATIONS = {"none": ("center",), "flip": ("center", "flip"), "tencrop": VIEWS}
MAX_DATASETS = 64
SELECT_MEAN = "mean"


@dataclass(frozen=True)
class Dataset:
    """One captions file (COCO or Karpathy format) and the folder of its images.

    ``weight`` scales how often a training set's captions are seen per epoch: 2 shows each twice, 0.5 a
    random half of them (drawn afresh each epoch); it lets a small set count as much as a large one."""

    captions: str = option("", "COCO or Karpathy captions file")
    images: str = option("", "folder of its images")
    weight: float = option(1.0, "times each caption is seen per epoch", range=(0.01, 100.0))
    name: str = option("", "name in the log (default: the captions file's folder name)")

    def __post_init__(self) -> None:
        check_fields(self, ConfigError, "dataset")
        for name in ("captions", "images"):
            if not getattr(self, name):
                raise ConfigError(f"dataset {self.describe()}: {name}= is required")
        if not self.name:
            object.__setattr__(self, "name", Path(self.captions).resolve().parent.name or Path(self.captions).stem)

    def describe(self) -> str:
        return ",".join(f"{key}={value}" for key, value in (("captions", self.captions), ("images", self.images))
                        if value) or "(empty)"

    @classmethod
    def parse(cls, text: str) -> dict:
        """A flag's ``captions=FILE,images=DIR[,weight=W][,name=NAME]`` as the dict a config file would hold; a key
        given twice is refused rather than the last one silently winning."""
        values: dict = {}
        for item in text.split(","):
            key, equals, value = item.partition("=")
            key = key.strip()
            if not equals or key not in ("captions", "images", "weight", "name"):
                raise ConfigError(f"dataset {text!r}: expected captions=FILE,images=DIR[,weight=W][,name=NAME], "
                                  f"not {item!r}")
            if key in values:
                raise ConfigError(f"dataset {text!r}: {key}= is given twice")
            try:
                values[key] = float(value) if key == "weight" else value
            except ValueError:
                raise ConfigError(f"dataset {text!r}: weight must be a number, not {value!r}") from None
        return values


def datasets(entries: object, what: str) -> list[Dataset]:
    """Checked :class:`Dataset` s from a list of dicts (config file, ``trainer.json`` or parsed flags): at most
    ``MAX_DATASETS``, no captions file twice, no name twice."""
    if not isinstance(entries, list) or len(entries) > MAX_DATASETS:
        raise ConfigError(f"{what} must be a list of at most {MAX_DATASETS} datasets")
    found = [from_dict(Dataset, check_object(Dataset, entry, "dataset key", what), "dataset key", what)
             for entry in entries]
    for kind, key in (("captions file", lambda d: Path(d.captions).resolve()), ("name", lambda d: d.name)):
        seen: set = set()
        for dataset in found:
            if key(dataset) in seen:
                raise ConfigError(f"{what}: {kind} {key(dataset)} is given twice" +
                                  (" (name the sets with name=)" if kind == "name" else ""))
            seen.add(key(dataset))
    return found


@dataclass
class TrainConfig:
    """Every training option; the CLI flags and config files fill this one dataclass."""

    images: str = option("", "folder of training images (and validation images unless --val-images)")
    train_captions: str = option("", "training annotations: COCO captions JSON or a Karpathy-split file")
    val_captions: str = option("", "validation annotations (default: the 'val' split of a Karpathy file)")
    val_images: str = option("", "folder of validation images, if not --images")
    out: str = option("runs/captioner", "output folder: best/, last/, log.jsonl, training.png and TensorBoard "
                                        "events in tensorboard/")
    encoder: str = option(DEFAULT_ENCODER, "CNN backbone", choices=BACKBONE_NAMES)
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
    lr: float = option(4e-4, "Adam learning rate for the decoder", range=(0, 1), open="low")
    weight_decay: float = option(0.0, "Adam weight decay", range=(0, 1))
    lr_schedule: str = option("cosine", "learning-rate schedule over the cross-entropy epochs",
                               choices=("cosine", "constant"))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", range=(0, 1000000000))
    grad_clip: float = option(5.0, "clip the gradient norm to this (0 = off)", range=(0, 1000000.0))
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss", range=(0, 1), open="high")
    scheduled_sampling: float = option(0.0, "final probability of feeding back the model's own word (0 = off)",
                                       range=(0, 1))
    patience: int = option(5, "stop a phase after this many epochs without a better validation score", range=(0, 10000))
    select_metric: str = option("CIDEr-D", "validation metric that selects the best checkpoint",
                                 choices=("CIDEr-D", "BLEU-4", "ROUGE-L", "BLEU-1"))
    beam_size: int = option_like(GenerationConfig, "beam_size", "beam size for validation and the checkpoint's "
                                                                "default decoding")
    length_penalty: float = option_like(GenerationConfig, "length_penalty", "length penalty for validation and the "
                                                                          "checkpoint's default decoding")
    max_length: int = option_like(GenerationConfig, "max_length", "longest generated caption in words")
    finetune_encoder: bool = option(False, "train the CNN too (no feature cache; slow without a GPU)")
    encoder_lr: float = option(1e-5, "learning rate for the CNN with --finetune-encoder", range=(0, 1), open="low")
    init_from: str = option("", "start from this trained checkpoint (its vocabulary, encoder and decoder; "
                                "--encoder-weights replaces its encoder's) instead of from scratch, e.g. to "
                                "fine-tune the CNN under a trained decoder")
    init_member: int = option(0, "with --init-from an ensemble: the member (1, 2, ...) to start from",
                              range=(0, 1000))
    fresh_decoder: bool = option(False, "with --init-from: keep its vocabulary and encoder but start a new random "
                                        "decoder, to train another member for its ensemble")
    scst_epochs: int = option(0, "self-critical sequence training epochs after cross-entropy (0 = off)", range=(0, 10000))
    scst_lr: float = option(2e-5, "learning rate during SCST", range=(0, 1), open="low")
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
    feature_cache: str = option("", f"feature cache folder (default {cache_dir('features')})")
    augment: str = option("none", "extra cached views of each training image, one picked at random per caption: "
                           "flip (mirror image) or tencrop (corner crops and mirrors, torchvision's TenCrop)",
                           choices=tuple(AUGMENTATIONS))
    skip_invalid: bool = option(False, "train on the valid items of a flawed annotation file instead of stopping")
    train_sets: list[dict] = field(default_factory=list, metadata={
        "help": "a training set, captions=FILE,images=DIR[,weight=W][,name=NAME]; repeat for several (instead "
                "of --train-captions and --images)", "parse": Dataset.parse})
    val_sets: list[dict] = field(default_factory=list, metadata={
        "help": "a validation set, captions=FILE,images=DIR[,name=NAME]; repeat for several (instead of "
                "--val-captions and --val-images)", "parse": Dataset.parse})
    select_set: str = option("", "the validation set whose select_metric picks best/: its name, or 'mean' for "
                                 "the mean over all sets (default: the first)")

    # Options a resumed run may change: nothing already learnt depends on them (the run folder may move too).
    RESUMABLE = ("out", "feature_cache", "epochs", "scst_epochs", "scst_lr", "scst_samples", "scst_batch_size",
                 "scst_baseline", "patience", "device", "num_workers", "precision", "compile")

    def validate(self) -> None:
        """Types and ranges (from each field's metadata, like every option dataclass), then combinations."""
        check_fields(self, ConfigError)
        train, val = self.datasets()
        if self.select_set not in ("", SELECT_MEAN, *(d.name for d in val)):
            raise ConfigError(f"select_set {self.select_set!r} is not a validation set's name "
                              f"({', '.join(d.name for d in val)}) or {SELECT_MEAN!r}")
        if self.epochs + self.scst_epochs < 1:
            raise ConfigError("nothing to train: epochs and scst_epochs are both 0")
        if self.scst_baseline == "mean" and self.scst_samples < 2:
            raise ConfigError("the mean SCST baseline needs scst_samples of 2 or more")
        if self.init_member and not self.init_from:
            raise ConfigError("--init-member picks a member of the --init-from ensemble; give --init-from too")
        if self.fresh_decoder and (self.init_member or not self.init_from):
            raise ConfigError("--fresh-decoder takes --init-from's vocabulary and encoder only; give --init-from "
                              "without --init-member")
        if self.finetune_encoder and self.scst_epochs:
            raise ConfigError("--scst-epochs works from cached features; it cannot be combined with --finetune-encoder")

    def datasets(self) -> tuple[list[Dataset], list[Dataset]]:
        """The training and the validation sets: ``train_sets``/``val_sets``, or the one set each that
        ``train_captions``, ``images``, ``val_captions`` and ``val_images`` describe (the two ways do not mix)."""
        if self.train_sets and (self.train_captions or self.images):
            raise ConfigError("give the training data either as train_sets or as train_captions and images, not both")
        if self.val_sets and (self.val_captions or self.val_images):
            raise ConfigError("give the validation data either as val_sets or as val_captions and val_images, not both")
        if self.train_sets:
            train = datasets(self.train_sets, "train_sets")
        else:
            for name in ("images", "train_captions"):
                if not getattr(self, name):
                    raise ConfigError(f"--{name.replace('_', '-')} is required (or --train-sets)")
            train = [Dataset(self.train_captions, self.images)]
        if self.val_sets:
            val = datasets(self.val_sets, "val_sets")
        elif self.val_captions or not self.train_sets:  # a Karpathy file's own val split when no val_captions
            val = [Dataset(self.val_captions or self.train_captions, self.val_images or self.images or train[0].images)]
        else:
            raise ConfigError("with train_sets, give the validation data too (val_sets or val_captions)")
        if any(d.weight != 1.0 for d in val):
            raise ConfigError("val_sets: weight is for training sets; every validation image counts once")
        return train, val

    def generation(self) -> GenerationConfig:
        return GenerationConfig(beam_size=self.beam_size, length_penalty=self.length_penalty,
                                max_length=self.max_length)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        config = from_dict(cls, {key.replace("-", "_"): value for key, value in data.items()}, "option", source)
        for name in ("train_sets", "val_sets"):
            datasets(getattr(config, name), f"{source}: {name}")
        return config


def run_options(flags: dict, file: dict | None = None, saved: dict | None = None,
                file_name: str = "config file") -> TrainConfig:
    """A run's options, each taken from the first place that gives it: the command-line ``flags``, the
    ``--config`` ``file`` (named ``file_name`` in errors), the options ``saved`` by the run being resumed,
    the defaults. The file is checked on its own first, so an unknown option in it is named by its file."""
    file = file or {}
    TrainConfig.from_dict(file, file_name)
    return TrainConfig.from_dict({**(saved or {}), **file, **flags})


def resume_folder(flags: dict, file: dict | None = None) -> Path:
    """The run folder ``--resume`` continues: ``out`` from the flags, else from the config file, else the default."""
    return Path(flags.get("out") or (file or {}).get("out") or TrainConfig.out)
