"""The model a run trains: where it starts (a new model, ``--init-from`` a checkpoint, or ``last/`` on resume) and
what training runs forward through (DistributedDataParallel under torchrun, ``torch.compile`` on request)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..data.annotations import ImageCaptions
from ..distributed import Distributed
from ..errors import CheckpointError, ConfigError
from ..models.captioner import Captioner
from ..models.decoder import Decoder, DecoderConfig
from ..models.encoder import Encoder
from ..models.weights import EncoderWeights
from .config import TrainConfig
from .data import vocabulary

log = logging.getLogger(__name__)


def initial_model(config: TrainConfig, records: list[ImageCaptions]) -> Captioner:
    """The model a new run starts from: a vocabulary of ``records``' captions, the pretrained CNN and a random
    decoder; or, with ``init_from``, that checkpoint's vocabulary, encoder (unless ``encoder_weights``) and
    decoder (``init_member`` of an ensemble), with this run's dropout; with ``fresh_decoder``, a random decoder on that
    vocabulary and encoder instead (a new member for the ensemble). The decoder's shape must be the options'."""
    if not config.init_from:
        vocab = vocabulary(records, config.min_word_count)
        encoder = Encoder.pretrained(config.encoder, config.encoder_weights or None)
        return Captioner(encoder, new_decoder(config, encoder, len(vocab)), vocab, config.generation())
    start = Captioner.from_pretrained(config.init_from, device="cpu", engine="torch",
                                      encoder_weights=config.encoder_weights or None)
    if start.encoder.config.name != config.encoder:
        raise ConfigError(f"--init-from {config.init_from} has encoder {start.encoder.config.name}, this run asks "
                          f"for {config.encoder}")
    if config.fresh_decoder:
        log.info("a new decoder on %s's vocabulary and encoder", config.init_from)
        return Captioner(start.encoder, new_decoder(config, start.encoder, len(start.vocab)), start.vocab,
                         config.generation())
    members = start.decoder.decoders()
    if len(members) > 1 and not 1 <= config.init_member <= len(members):
        raise ConfigError(f"--init-member {config.init_member}: {config.init_from} is an ensemble of {len(members)} "
                          f"decoders; pick one, 1 to {len(members)}")
    if len(members) == 1 and config.init_member > 1:
        raise ConfigError(f"--init-member {config.init_member}: {config.init_from} has one decoder")
    member = members[max(1, config.init_member) - 1]
    for name in ("embed_size", "hidden_size", "num_layers"):
        if getattr(member.config, name) != getattr(config, name):
            raise ConfigError(f"--init-from {config.init_from} has {name} {getattr(member.config, name)}, this run "
                              f"asks for {getattr(config, name)}")
    decoder = Decoder(replace(member.config, dropout=config.dropout, input_dropout=config.input_dropout))
    decoder.load_state_dict(member.state_dict())
    log.info("starting from %s%s (its vocabulary; min_word_count is not used)", config.init_from,
             f", member {config.init_member}" if len(members) > 1 else "")
    return Captioner(start.encoder, decoder, start.vocab, config.generation())


def new_decoder(config: TrainConfig, encoder: Encoder, vocab_size: int) -> Decoder:
    """A randomly initialised decoder of the options' shape for ``encoder``'s features."""
    return Decoder(DecoderConfig(encoder.config.feature_size, vocab_size, config.embed_size, config.hidden_size,
                                 config.num_layers, config.dropout, config.input_dropout))


def start_model(config: TrainConfig, records: list[ImageCaptions], device: torch.device,
                resume_from: Path | None = None) -> Captioner:
    """The model on ``device``: ``resume_from``'s (``last/``), or :func:`initial_model` of ``records``."""
    if resume_from is not None:
        if not resume_from.is_dir():
            raise CheckpointError(f"{resume_from}: nothing to resume (no last checkpoint in {Path(config.out)})")
        # PyTorch, not ONNX Runtime: the exported graphs are a snapshot, and validation must see each step
        return Captioner.from_pretrained(resume_from, device=device, engine="torch")
    model = initial_model(config, records).to(device)
    if config.finetune_encoder:
        model.encoder.config.weights = EncoderWeights("fine-tuned")
    return model


def wrap(module: nn.Module, config: TrainConfig, dist: Distributed) -> nn.Module:
    """What training runs ``module`` forward through: DistributedDataParallel under torchrun; torch.compile on
    request. Its parameters, the optimizer and what is saved stay the unwrapped module's."""
    if dist.enabled:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    # torch.compile of a module returns a module (OptimizedModule); its annotation says only "a callable"
    return cast(nn.Module, torch.compile(module)) if config.compile else module
