"""Processes under `torchrun`: who this process is, and the few collectives QAT needs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (a plain `qcli` call) this is a
world of one and every collective is the identity, so the same code runs either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Comm:
    rank: int = 0
    world: int = 1
    device: torch.device = CPU

    @property
    def primary(self) -> bool:
        """Only rank 0 writes checkpoints, output and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous [lo, hi) share of n items (the first ranks take one more)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def gather(self, part: Tensor, n: int) -> Tensor:
        """Every rank's `shard(n)` rows of a tensor, concatenated in rank order, on every rank."""
        if not self.distributed:
            return part
        rows = -(-n // self.world)
        padded = torch.zeros((rows, *part.shape[1:]), dtype=part.dtype, device=self.device)
        padded[: part.shape[0]] = part.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        sizes = [Comm(r, self.world).shard(n) for r in range(self.world)]
        return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, sizes, strict=True)])

    def gather_objects(self, obj: object) -> list[object]:
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (an initialization computed once)."""
        if self.distributed:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def reporting_process() -> bool:
    """Whether this process prints the command's result: rank 0 under torchrun, else yes."""
    return os.environ.get("RANK", "0") == "0"


def start(default_device: torch.device) -> Comm:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA, device from LOCAL_RANK),
    or a world of one."""
    if not under_torchrun():
        return Comm(device=default_device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if default_device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return Comm(rank, world, device)


def stop(comm: Comm) -> None:
    if comm.distributed and dist.is_initialized():
        dist.destroy_process_group()
