"""What the training step keeps and shares: per-batch seeds, run totals, the logging window, collectives."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def batch_torch_seed(seed: int, rank: int, epoch: int, index: int, worker: int = -1) -> int:
    """The torch seed for one training batch on one rank."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 15_485_863 + index * 104_729 + (worker + 1) * 611_953) % 2**63


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class DataLoadError(RuntimeError):
    """Too many cuts of the recent batches failed to load."""


@dataclass
class StepOptions:
    """What the training step needs beyond the model: taken from the trainer and data sections."""

    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    max_bad_steps: int = 20
    max_failed_fraction: float = 0.1


@dataclass
class RunTotals:
    """Counters of the whole run, all ranks and every resume included (kept in checkpoints)."""

    audio_seconds: float = 0.0
    padded_seconds: float = 0.0
    cuts: int = 0
    failed_cuts: int = 0
    skipped_steps: int = 0
    oom_retries: int = 0
    first_loss: Optional[float] = None  # mean loss of the first logging window (or of a shorter run)
    last_loss: Optional[float] = None  # mean loss of the last logging window


@dataclass
class Window:
    """Host-side counts of this rank since the last logging step."""

    audio_seconds: float = 0.0
    padded_seconds: float = 0.0
    cuts: int = 0
    failed: int = 0
    oom_retries: int = 0
    first_failures: list = field(default_factory=list)  # (cut id, reason), a few
    data_wait: float = 0.0
    batches: int = 0
    # The whole window since the last logging step (the counts above may have gone to the totals earlier).
    window_audio: float = 0.0
    window_cuts: int = 0
    window_failed: int = 0
    started: float = field(default_factory=time.perf_counter)


def norm_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Running statistics of every BatchNorm kind in ``model`` (BatchNorm1d, SyncBatchNorm, ...)."""
    return [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce without Lightning's barrier (which would block the host on NCCL)."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t
