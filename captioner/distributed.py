"""Data-parallel training over ``torchrun``: process-group set-up and the few collectives training needs.

``torchrun --nproc_per_node N train.py ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without
them this is a single process and every helper is a no-op. The backend is ``nccl`` on GPUs and
``gloo`` on CPUs. Gradients are averaged by PyTorch's DistributedDataParallel; this module only
splits feature extraction across ranks and shares small results (scores, random states).
Bulk captioning needs no process group: :func:`launched_rank` only tells each process its share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from .errors import ConfigError
from .runtime import pick_device


class Launch(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def launched_rank() -> Launch:
    """This process's place as torchrun describes it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process
    outside torchrun. Joins no process group: for work whose processes never need to talk (bulk captioning)."""
    try:
        launch = Launch(*(int(os.environ.get(name, default)) for name, default in
                          (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ConfigError(f"RANK must be between 0 and WORLD_SIZE - 1, not RANK={launch.rank} "
                          f"WORLD_SIZE={launch.world_size}")
    return launch


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto") -> "Distributed":
        """Join the process group that torchrun describes (if any) and pick this rank's device."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(0, 1, pick_device(device))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = pick_device(device)
        if chosen.type == "cuda":
            chosen = torch.device("cuda", local_rank)
            torch.cuda.set_device(chosen)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), chosen)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value):
        """``value`` as rank 0 has it, on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(total)
        return float(total.item())

    def gather_rows(self, rows: torch.Tensor, total: int) -> torch.Tensor:
        """Reassemble rows split round-robin (rank r held items r, r + W, r + 2W ...) into one tensor."""
        if not self.enabled:
            return rows
        width = -(-total // self.world_size)
        padded = rows.new_zeros((width, *rows.shape[1:]))
        padded[: len(rows)] = rows
        padded = padded.to(self._collective_device())
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        out = rows.new_empty((total, *rows.shape[1:]))
        for rank, piece in enumerate(pieces):
            count = len(range(rank, total, self.world_size))
            out[rank::self.world_size] = piece[:count].to(out.device)
        return out

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
