"""Collectives without Lightning: the world size and an in-place all-reduce (a no-op on one process)."""
from __future__ import annotations

import torch


def world_size() -> int:
    """Processes of the default process group; 1 when there is none."""
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce without Lightning's barrier (which would block the host on NCCL)."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t
