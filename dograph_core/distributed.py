"""Several processes: set up ``torch.distributed`` from the variables ``torchrun`` sets.

gloo on CPUs, NCCL on GPUs. One process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) needs no setup
and every helper here degrades to the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    owned: bool = False  # this module started the process group (and ends it in cleanup)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` = this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine; use 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by ``torchrun``; a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    else:
        backend = dist.get_backend()
    return DistInfo(rank, world, local, backend, owned)


def make_reduce(info: DistInfo, device: torch.device):
    """An all-reduce (sum) for mixer statistics; tensors travel on the backend's device and come back."""
    if not info.enabled:
        return lambda t: t
    comm = device if info.backend == "nccl" else torch.device("cpu")

    def reduce(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(comm, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    return reduce


def mean_scalar(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a scalar over ranks (the step loss everyone logs and checks for NaN)."""
    if not info.enabled:
        return value
    comm = device if info.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=comm)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and info.owned and dist.is_initialized():
        dist.destroy_process_group()
