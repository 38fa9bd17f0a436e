"""Process-group set-up for `torchrun` (gloo on CPU, nccl on CUDA) and the few collectives we use.

Without torchrun every helper degrades to the single-process case, so the loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from vgen.errors import UsageError

        raise UsageError("device 'cuda' was requested but torch sees no CUDA device")
    return device


def init_distributed(device_name: str = "auto") -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        # Processes on one machine share its cores; oversubscription makes every step slower (two
        # runs side by side on 2 cores, 2 threads each: 4x slower than 1 each). A thread count the
        # user set (OMP_NUM_THREADS, which torch reads) is theirs to keep.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Distributed(rank, world_size, local_rank, device)


def shutdown(d: Distributed) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a copy of `t` ('sum', 'mean' or 'max'); the identity in a single process."""
    if not dist.is_initialized():
        return t.clone()
    # NCCL reduces CUDA tensors only; the flags and scalars the loop reduces are made on the CPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    out = out.to(t.device)
    return out / dist.get_world_size() if op == "mean" else out


def broadcast_object(obj):
    """The main process's `obj` (a small picklable value made by vgen itself) on every process."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0, keeping gradients (for contrastive losses)."""
    if not dist.is_initialized():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)
