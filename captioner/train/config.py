"""Every training option in one dataclass, :class:`TrainConfig`, checked before any work.

The CLI (flags, ``--config`` files, ``--resume``'s saved options) needs only this module; the
decoder's and decoding's options take their defaults and bounds from their own dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bounds import check_fields, from_dict, option, option_like
from ..errors import ConfigError
from ..generation.config import GenerationConfig
from ..models.decoder import DecoderConfig
from ..models.preprocessing import VIEWS
from ..models.weights import BACKBONES, DEFAULT_ENCODER
from ..runtime import cache_dir

AUGMENTATIONS = {"none": ("center",), "flip": ("center", "flip"), "tencrop": VIEWS}


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
    feature_cache: str = option("", f"feature cache folder (default {cache_dir('features')})")
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
        return from_dict(cls, {key.replace("-", "_"): value for key, value in data.items()}, "option", source)


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
