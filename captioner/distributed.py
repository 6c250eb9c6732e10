"""Data-parallel training over ``torchrun``: process-group set-up and the few collectives training needs.

``torchrun --nproc_per_node N train.py ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without
them this is a single process and every helper is a no-op. The backend is ``nccl`` on GPUs and
``gloo`` on CPUs. Gradients are averaged by PyTorch's DistributedDataParallel; this module only
splits feature extraction across ranks and shares small results (scores, random states).
Bulk captioning needs no process group: :func:`launched_rank` only tells each process its share, and torch is
imported only by the calls that need it, so the bulk modules that ask it (``captioner merge`` too) load no PyTorch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from .errors import ConfigError
from .runtime import pick_device

if TYPE_CHECKING:
    import torch

MAX_WORLD_SIZE = 1_000_000


class Launch(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def launched_rank() -> Launch:
    """This process's place as torchrun describes it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process
    outside torchrun. Joins no process group: for work whose processes never need to talk (bulk captioning).

    The one reader of these variables, for training and captioning alike: a bad one is a :class:`ConfigError`
    naming it and its value. ``LOCAL_RANK`` counts the processes of one machine, so it is below ``WORLD_SIZE`` too.
    """
    world_size = _environment_integer("WORLD_SIZE", 1, 1, MAX_WORLD_SIZE)
    bound = " (WORLD_SIZE - 1)" if world_size > 1 else " (WORLD_SIZE is 1)"
    rank = _environment_integer("RANK", 0, 0, world_size - 1, bound)
    local_rank = _environment_integer("LOCAL_RANK", 0, 0, world_size - 1, bound)
    return Launch(rank, world_size, local_rank)


def _environment_integer(name: str, default: int, low: int, high: int, note: str = "") -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer (as torchrun sets it), "
                          f"not {text[:20]!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"environment variable {name} must be between {low} and {high}{note}, not {value}")
    return value


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: _torch().device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto") -> "Distributed":
        """Join the process group that torchrun describes (if any) and pick this rank's device."""
        import torch
        import torch.distributed as dist

        launch = launched_rank()
        if launch.world_size == 1:
            return cls(0, 1, pick_device(device))
        for name in ("MASTER_ADDR", "MASTER_PORT"):  # where the processes meet; torchrun sets both
            if not os.environ.get(name):
                raise ConfigError(f"WORLD_SIZE is {launch.world_size} but environment variable {name} is not set: "
                                  "start the processes with torchrun")
        _environment_integer("MASTER_PORT", 0, 1, 65535)
        chosen = pick_device(device)
        if chosen.type == "cuda":
            if launch.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK is {launch.local_rank} but only {torch.cuda.device_count()} GPUs are "
                                  "visible; start at most one process per GPU")
            chosen = torch.device("cuda", launch.local_rank)
            torch.cuda.set_device(chosen)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", rank=launch.rank,
                                    world_size=launch.world_size)
        return cls(dist.get_rank(), dist.get_world_size(), chosen)

    def barrier(self) -> None:
        if self.enabled:
            _dist().barrier()

    def broadcast(self, value):
        """``value`` as rank 0 has it, on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        _dist().broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        _dist().all_gather_object(values, value)
        return values

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        torch = _torch()
        total = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        _dist().all_reduce(total)
        return float(total.item())

    def gather_rows(self, rows: torch.Tensor, total: int) -> torch.Tensor:
        """Reassemble rows split round-robin (rank r held items r, r + W, r + 2W ...) into one tensor."""
        if not self.enabled:
            return rows
        width = -(-total // self.world_size)
        padded = rows.new_zeros((width, *rows.shape[1:]))
        padded[: len(rows)] = rows
        padded = padded.to(self._collective_device())
        pieces = [_torch().empty_like(padded) for _ in range(self.world_size)]
        _dist().all_gather(pieces, padded)
        out = rows.new_empty((total, *rows.shape[1:]))
        for rank, piece in enumerate(pieces):
            count = len(range(rank, total, self.world_size))
            out[rank::self.world_size] = piece[:count].to(out.device)
        return out

    def _collective_device(self) -> torch.device:
        return self.device if _dist().get_backend() == "nccl" else _torch().device("cpu")

    def close(self) -> None:
        if self.enabled and _dist().is_initialized():
            _dist().destroy_process_group()


def _torch():
    import torch

    return torch


def _dist():
    import torch.distributed as dist

    return dist
