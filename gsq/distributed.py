"""One process or many: the torchrun setup and the few collective operations the trainer, the
evaluation and the metrics share.

Under torchrun (WORLD_SIZE / RANK / LOCAL_RANK set) every rank joins one process group: NCCL on
GPUs, gloo on CPUs. Every helper here is a no-op returning its input when there is one process, so
callers never branch on it; with several, every rank must call it at the same point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_process_group: bool = False  # this call set the group up, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_processes(device: str = "auto", option: str = "device") -> Processes:
    """This process, or this torchrun rank, on `device` ("auto", "cpu" or "cuda"; `option` names
    the setting in the error for "cuda" without a GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{option}=cuda but no CUDA device is visible")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world_size, local_rank, chosen, owns)


def finish_processes(processes: Processes) -> None:
    """Wait for every rank, then leave the process group if `setup_processes` created it."""
    if processes.distributed:
        dist.barrier()
        if processes.owns_process_group:
            dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: Tensor) -> Tensor:
    """The sum of `values` over every rank, on `values`' device; `values` itself is never changed
    (with one process it is returned as is). NCCL reduces on this rank's GPU, gloo where it lies."""
    if not _active():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    reduced = values.to(device, copy=True)
    dist.all_reduce(reduced)
    return reduced.to(values.device)


def sum_over_ranks(value: float | Tensor) -> Tensor:
    """A number (or tensor) summed over every rank, as a float64 CPU tensor."""
    return all_reduce_sum(torch.as_tensor(value, dtype=torch.float64).cpu())


def mean_over_ranks(value: float | Tensor) -> Tensor:
    """A number (or tensor) averaged over every rank, as a float64 CPU tensor."""
    total = sum_over_ranks(value)
    return total / dist.get_world_size() if _active() else total


def any_rank(processes: Processes, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (so that all of them stop at the same step)."""
    if not processes.distributed:
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def broadcast_from_main(processes: Processes, value: T) -> T:
    """rank 0's `value` on every rank (any picklable object)."""
    if not processes.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(processes: Processes, value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not processes.distributed:
        return [value]
    gathered = [None] * processes.world_size
    dist.all_gather_object(gathered, value)
    return gathered
