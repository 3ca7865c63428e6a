"""Several processes working on one stage, launched by `torchrun` (torch.distributed: NCCL on
GPUs, gloo on CPUs). One code path: a single process is a group of world size 1 whose collective
operations are no-ops, so every stage runs the same code with or without torchrun.

Ranks must see the same working directory (one node, or a shared file system across nodes):
rank 0 writes the stage's outputs, and every rank reads the same inputs and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError
from pipeline.run.processes import die_with_launcher


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor (every world-th row, starting at the rank)."""
        return rows[self.rank::self.world]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


SINGLE = Group()


def balanced_owners(costs: list[float], world: int) -> list[int]:
    """The rank that does each piece of work: costliest first, each to the least loaded rank (ties to the
    lower rank), so every rank computes the same assignment."""
    owners, load = [0] * len(costs), [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owners[i] = min(range(world), key=lambda r: load[r])
        load[owners[i]] += costs[i]
    return owners


def device_of(model) -> torch.device:
    """Where a model's weights are (a module without parameters runs on the CPU)."""
    return next(model.parameters(), torch.empty(0)).device


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("compute.device is 'cuda' but torch sees no GPU: use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(device_name: str = "auto") -> Group:
    """The process group this process belongs to: joins torchrun's group when launched by torchrun
    (WORLD_SIZE > 1), else a single-process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world == 1:
        return Group(device=device)
    die_with_launcher()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Group(dist.get_rank(), dist.get_world_size(), device)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads for this process: `threads`, or the cores this process may use divided
    among the processes torchrun started on this machine (each would otherwise take every core, and
    threads spinning on a busy core make a search generation several times slower). Returns the count."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads
