"""The optimizer and learning-rate schedule of each phase.

Cross-entropy: Adam over the decoder (and, with ``finetune_encoder``, the CNN at ``encoder_lr``) with weight decay,
a linear warm-up over ``warmup_steps`` and then a cosine decay to zero at the last step (or a constant rate).
SCST: Adam over the decoder at ``scst_lr``, constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from ..models.captioner import Captioner
from .config import TrainConfig


def lr_factor(warmup_steps: int, lr_schedule: str, total_steps: int) -> Callable[[int], float]:
    """The factor of the learning rate at each step: warm-up, then cosine (or ``constant``) over ``total_steps``."""

    def factor(step: int) -> float:  # a function, not a callable object: LambdaLR's state_dict then stores None
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(config: TrainConfig, model: Captioner, phase: str,
                   steps_per_epoch: int) -> tuple[Optimizer, LRScheduler]:
    """The optimizer and schedule of ``phase`` (``xe`` or ``scst``) over ``model``'s trained parameters."""
    if phase == "scst":
        optimizer = torch.optim.Adam(model.decoder.parameters(), lr=config.scst_lr)
        return optimizer, LambdaLR(optimizer, lambda step: 1.0)
    groups = [{"params": list(model.decoder.parameters()), "lr": config.lr}]
    if config.finetune_encoder:
        groups.append({"params": list(model.encoder.parameters()), "lr": config.encoder_lr})
    optimizer = torch.optim.Adam(groups, weight_decay=config.weight_decay)
    total = max(1, config.epochs * steps_per_epoch)
    return optimizer, LambdaLR(optimizer, lr_factor(config.warmup_steps, config.lr_schedule, total))
