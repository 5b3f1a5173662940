"""The process group of a pretraining run: one process, or one per GPU under ``torchrun``.

:func:`setup_world` joins PyTorch DDP when launched by torchrun (NCCL on CUDA, gloo on the
CPU) or when a caller already made a group; :func:`sync_buffers` and
:func:`gather_labelled` are the collective steps the loop needs besides DDP's own.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from napari_lsmfm.engine.device import resolve_device


@dataclass
class World:
    """This process's rank, the number of processes, its device, and whether this run
    made the process group (and so destroys it at the end)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup_world(device_name: str) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) or when a caller
    already initialised one; otherwise a single process on ``device_name``."""
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        else:
            device = resolve_device("cpu" if device_name == "auto" else device_name)
        return World(rank, size, device, owns_group=False)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(0, 1, resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith(("cpu", "mps"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device, owns_group=True)


def hardware(world: World) -> dict:
    """What ran the job (device, processes, threads, versions, GPU name), for the record."""
    out = {
        "device": str(world.device),
        "world_size": world.size,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if world.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(world.device)
    return out


def sync_buffers(model: nn.Module, teacher: nn.Module | None, world: World) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics drift apart between DDP's
    per-step broadcasts), so checkpoints and final weights are identical on all ranks."""
    if not world.distributed:
        return
    for module in (model, teacher):
        if module is None:
            continue
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def gather_labelled(
    rows: torch.Tensor, ids: torch.Tensor, world: World
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows, ids) concatenated, rows differentiably (DDP); unchanged alone."""
    if not world.distributed:
        return rows, ids
    from torch.distributed.nn.functional import all_gather

    count = torch.tensor([rows.shape[0]], device=rows.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    total = int(count.item())
    if total == 0:
        return rows, ids
    padded = rows.new_zeros((total, *rows.shape[1:]))
    padded = padded.index_copy(0, torch.arange(rows.shape[0], device=rows.device), rows)
    padded_ids = torch.full((total,), -2, dtype=torch.long, device=rows.device)
    padded_ids[: ids.shape[0]] = ids
    gathered_ids = [torch.empty_like(padded_ids) for _ in range(world.size)]
    dist.all_gather(gathered_ids, padded_ids)
    all_ids = torch.cat(gathered_ids)
    keep = all_ids != -2  # the padding of ranks with fewer rows
    return torch.cat(all_gather(padded))[keep], all_ids[keep]
