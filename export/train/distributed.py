"""Multi-GPU / multi-node training under torchrun (DistributedDataParallel); a no-op otherwise.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The backend is NCCL on
CUDA and gloo on CPU (what the tests use). Data are split across ranks by
:class:`~.samplers.StepBatchSampler` (each rank draws different sample ids).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA (this process's local GPU) when available, else CPU; "cuda" likewise per rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def setup(device: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (a copy; t itself is left alone)."""
    if not ctx.distributed:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / ctx.world_size


def broadcast_object(ctx: DistContext, obj: object) -> object:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(ctx: DistContext, module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last step each rank holds
    the statistics of its own last batch; call this before saving or comparing weights.
    """
    if not ctx.distributed:
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=0)


def wrap(ctx: DistContext, module: nn.Module) -> nn.Module:
    """DDP around ``module`` when distributed (every trainable parameter must take part in the loss)."""
    if not ctx.distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)


def state_digest(module: nn.Module) -> str:
    """sha256 of every state_dict tensor (names, dtypes, bytes): equal digests = identical weights."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_digests(ctx: DistContext, module: nn.Module) -> list[str]:
    """Every rank's :func:`state_digest`, in rank order."""
    d = state_digest(module)
    if not ctx.distributed:
        return [d]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, d)
    return [str(x) for x in out]
