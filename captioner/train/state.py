"""What ``last/`` carries beside the model so that ``--resume`` continues exactly where a run stopped.

``trainer.json`` holds the run's options, its :class:`Progress`, the optimizer's scalars and
parameter groups, and the learning-rate schedule; ``training_state.safetensors`` holds the
optimizer's tensors and every rank's random-number state. Nothing is pickled.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .. import checkpoint
from ..bounds import field_types
from ..distributed import Distributed
from ..errors import CheckpointError, ConfigError
from .config import TrainConfig

TRAINER_FILE, STATE_FILE = checkpoint.TRAINER_FILE, checkpoint.STATE_FILE


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


def state_files(config: TrainConfig, progress: Progress, optimizer: Optimizer, scheduler: LRScheduler,
                dist: Distributed) -> dict[str, Callable[[Path], None]]:
    """Files that join the model in ``last/``: optimizer, schedule, progress, every rank's RNG state.
    A collective: every rank takes part."""
    tensors, optimizer_json = _flatten_optimizer(optimizer)
    for rank, states in enumerate(dist.gather(_rng_states())):
        tensors.update({f"rng.{rank}.{name}": state for name, state in states.items()})
    trainer = {"config": asdict(config), "progress": asdict(progress), "optimizer": optimizer_json,
               "scheduler": scheduler.state_dict(), "world_size": dist.world_size}
    return {STATE_FILE: lambda path: checkpoint.save_tensors(tensors, path),
            TRAINER_FILE: lambda path: checkpoint.write_json(path, trainer)}


def restore(last: Path, config: TrainConfig, dist: Distributed,
            make_optimizer: Callable[[str], tuple[Optimizer, LRScheduler]]) -> tuple[Progress, Optimizer, LRScheduler]:
    """The progress, optimizer (built by ``make_optimizer(phase)``) and schedule saved in ``last/``, with this
    rank's random-number state restored; only the options in ``TrainConfig.RESUMABLE`` may differ."""
    saved = read_trainer_file(last)
    previous = TrainConfig.from_dict(saved["config"])
    changed = [f.name for f in fields(TrainConfig)
               if f.name not in TrainConfig.RESUMABLE and getattr(previous, f.name) != getattr(config, f.name)]
    if changed:
        raise ConfigError(f"cannot resume with changed option(s) {', '.join(changed)}; "
                          f"only {', '.join(TrainConfig.RESUMABLE)} may change")
    tensors = checkpoint.load_tensors(last / STATE_FILE)
    try:
        progress = Progress(**saved["progress"])
        for name, (kind, _) in field_types(Progress).items():
            if not isinstance(getattr(progress, name), (int, float) if kind is float else kind):
                raise TypeError(f"progress.{name} has the wrong type")
        optimizer, scheduler = make_optimizer(progress.phase)
        _restore_optimizer(optimizer, tensors, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rank = dist.rank if saved.get("world_size", 1) == dist.world_size else 0
        prefix = f"rng.{rank}."
        _set_rng_states({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, dist.device)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{last}: inconsistent training state ({type(exc).__name__}: "
                              f"{reprlib.repr(str(exc).partition(chr(10))[0])})") from None
    return progress, optimizer, scheduler


def read_trainer_file(last: Path) -> dict:
    """``last/trainer.json``: the options of the interrupted run, checked like a config file, and its state."""
    trainer_file = last / TRAINER_FILE
    saved = checkpoint.read_json(trainer_file)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"{trainer_file}: no 'config' object")
    TrainConfig.from_dict(saved["config"], str(trainer_file))
    return saved


def _flatten_optimizer(optimizer: Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in saved["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"])
