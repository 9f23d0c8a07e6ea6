"""The guarded training step, plain torch: Lightning's module (nest.training.module) and the memory calibration
(nest.calibrate) run this same step.

It never waits on the accelerator:
- A non-finite loss or gradient skips the optimizer step on the device: the fused AdamW kernel receives
  ``found_inf`` as GradScaler hands it over, and leaves parameters, moments and its step count untouched.
  The flag is all-reduced (max) over ranks, so every replica skips together; BatchNorm statistics of any
  kind (BatchNorm1d, SyncedBatchNorm) touched by a non-finite forward pass are put back. How many steps were
  skipped is read on the host only at logging steps (nest.training.meters).
- Gradient accumulation is ours (``accumulate_grad_batches``): the backward passes of a window but the
  last run under ``no_sync`` (DDP's), so each window costs one gradient all-reduce, and the skip decision
  covers the whole window on every rank.
- A batch whose every cut failed to load arrives as one second of silence with no cut ids: it runs
  forward and backward with weight 0, so every rank takes part in every collective.
- A step that runs out of accelerator memory is retried as two half batches and counted. Under DDP a
  retry is only safe when the halves make no collective the other ranks do not make: an out-of-memory error
  in the forward pass of a model without synchronised BatchNorm (whose layers all-reduce in every forward
  and backward pass, so two halves would pair with other layers' collectives on the other ranks); otherwise
  the run stops with a message (resume=auto continues it).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from cuts.dataset import AudioNoiseBatch
from nest.training.distributed import all_reduce_, world_size
from nest.training.sync_batchnorm import SyncedBatchNorm

log = logging.getLogger(__name__)


@dataclass
class StepOptions:
    """What the training step needs beyond the model: taken from the trainer and data sections."""

    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    max_bad_steps: int = 20
    max_failed_fraction: float = 0.1


def batch_torch_seed(seed: int, rank: int, epoch: int, index: int, worker: int = -1) -> int:
    """The torch seed for one training batch on one rank."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 15_485_863 + index * 104_729 + (worker + 1) * 611_953) % 2**63


def norm_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Running statistics of every BatchNorm kind in ``model`` (BatchNorm1d, SyncedBatchNorm, SyncBatchNorm)."""
    return [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]


def forward_batch(model: torch.nn.Module, batch: AudioNoiseBatch) -> Any:
    """The objective's forward pass on a batch: targets from the clean audio (or the batch's labels), the noisy
    audio encoded."""
    extra = {} if batch.targets is None else {"targets": batch.targets}
    return model(batch.audio, batch.audio_lens, batch.noisy_audio, batch.audio_lens, **extra)


@dataclass
class MicroBatch:
    """What one call of the step did."""

    loss: torch.Tensor  # () detached, on the device; non-finite when the batch was bad
    finite: torch.Tensor  # () bool, on the device
    weight: float  # 1, or 0 for a batch whose cuts all failed to load
    out: Any  # the objective's output (of the last half, after an out-of-memory retry)
    window_end: bool  # the optimizer stepped (or skipped) after this batch
    oom_retries: int  # 1 when the batch ran out of memory and was retried as two halves


class GuardedStep:
    """Forward, backward and, at the end of each accumulation window, the optimizer step (module docstring).

    ``backward``, ``no_sync`` and ``optimizer_step`` default to plain torch; Lightning's module passes its
    ``manual_backward``, its strategy's ``block_backward_sync`` and its wrapped optimizer's ``step`` (which
    counts Lightning's global step). ``skipped`` continues the count of skipped steps of a resumed run. With
    ``retry_oom=False`` (calibration, which must see every out-of-memory error) nothing is retried.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, options: StepOptions, *,
        backward: Optional[Callable[[torch.Tensor], None]] = None,
        no_sync: Optional[Callable[[], ContextManager]] = None,
        optimizer_step: Optional[Callable[[], Any]] = None, skipped: int = 0, retry_oom: bool = True,
    ):
        self.model, self.optimizer, self.scheduler, self.options = model, optimizer, scheduler, options
        self.backward = backward or torch.Tensor.backward
        self.no_sync = no_sync or contextlib.nullcontext
        self.optimizer_step = optimizer_step or optimizer.step
        self.retry_oom = retry_oom
        self.micro = 0  # micro-batches done in the current accumulation window
        # After the strategy's set-up, which may have converted BatchNorm layers to SyncedBatchNorm.
        self.norm_buffers = norm_buffers(model)
        device = next(model.parameters()).device
        z = lambda dtype=torch.float32: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        self.bad, self.skipped, self.consecutive, self._one = z(torch.bool), z() + skipped, z(), z() + 1

    @property
    def between_windows(self) -> bool:
        """No accumulation window is open: a checkpoint taken now resumes exactly."""
        return self.micro == 0

    def __call__(self, batch: AudioNoiseBatch, forward: Callable[[AudioNoiseBatch], Any]) -> MicroBatch:
        """One micro-batch of ``forward`` (the objective's output, with ``.loss``)."""
        A = self.options.accumulate_grad_batches
        self.micro += 1
        last = self.micro == A
        weight = 1.0 if len(batch) else 0.0
        saved = [b.clone() for b in self.norm_buffers]
        with contextlib.nullcontext() if last else self.no_sync():
            loss, out, retried = self._forward_backward(batch, forward, weight / A, last)
        finite = torch.isfinite(loss)
        for buffer, old in zip(self.norm_buffers, saved):
            buffer.copy_(torch.where(finite, buffer, old))
        self.bad |= ~finite
        if last:
            self._optimizer_step()
            self.micro = 0
        return MicroBatch(loss, finite, weight, out, last, int(retried))

    def _forward_backward(self, batch: AudioNoiseBatch, forward, weight: float, last: bool):
        """Forward and backward of ``batch`` (its loss scaled by ``weight``); retried as two halves when the
        accelerator runs out of memory. Returns the detached loss, the output and whether it was retried."""
        stage = "forward"
        try:
            out = forward(batch)
            stage = "backward"
            self.backward(out.loss * weight)
            return out.loss.detach(), out, False
        except torch.OutOfMemoryError as e:
            if not self.retry_oom:
                raise
            out = None
            self._check_retry_is_safe(stage, batch, e)
        if stage == "backward":  # the first of its window (else refused above): drop its partial gradients
            self.optimizer.zero_grad(set_to_none=True)
        if batch.audio.device.type == "cuda":
            torch.cuda.empty_cache()
        halves = [h for h in batch.split() if h.audio.shape[0]]
        log.warning("out of memory in the %s pass of a batch of %d x %.1f s: retrying it as two halves", stage,
                    batch.audio.shape[0], self._seconds(batch))
        total = sum(h.audio.shape[0] for h in halves)
        losses, out = [], None
        for i, half in enumerate(halves):
            share = half.audio.shape[0] / total  # the halves are weighted by their utterances
            with self.no_sync() if last and i < len(halves) - 1 else contextlib.nullcontext():
                out = forward(half)
                self.backward(out.loss * weight * share)
            losses.append(out.loss.detach() * share)
        return torch.stack(losses).sum(), out, True

    def _seconds(self, batch: AudioNoiseBatch) -> float:
        return batch.audio.shape[1] / self.model.cfg.preprocessor.sample_rate

    def _check_retry_is_safe(self, stage: str, batch: AudioNoiseBatch, error: Exception) -> None:
        distributed = world_size() > 1
        sync_bn = any(isinstance(m, (SyncedBatchNorm, torch.nn.SyncBatchNorm)) for m in self.model.modules())
        partial_grads = stage == "backward" and self.micro > 1
        if batch.audio.shape[0] < 2:
            raise RuntimeError(f"out of memory on a single utterance of {self._seconds(batch):.1f} s (nothing to "
                               f"split): lower data.max_duration, and continue with resume=auto") from error
        if distributed and (stage == "backward" or sync_bn) or partial_grads:
            raise RuntimeError(
                f"out of memory in the {stage} pass of a batch of {batch.audio.shape[0]} utterances x "
                f"{self._seconds(batch):.1f} s, where a retry cannot be made safely "
                f"({'DDP collectives already ran' if distributed else 'gradients of the window are mixed'}): "
                f"lower data.batch_duration or the calibrated batch sizes (prepare.py calibrate --memory-fraction) "
                f"and continue with resume=auto"
            ) from error

    def _optimizer_step(self) -> None:
        found = self.bad.float()
        grads: dict[tuple, list[torch.Tensor]] = {}
        for p in self.model.parameters():
            if p.grad is not None:
                grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for group in grads.values():  # found |= any non-finite gradient, on the device (GradScaler's kernel)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, self._one)
        all_reduce_(found, torch.distributed.ReduceOp.MAX)  # every rank skips together
        if self.options.gradient_clip_val > 0:
            # What Lightning's precision plugins do for 32-true and bf16-mixed (clip_grad_by_norm).
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.options.gradient_clip_val)
        self.optimizer.found_inf = found  # read by the fused AdamW kernel: skip the update where it is 1
        try:
            self.optimizer_step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.skipped += found
        self.consecutive = (self.consecutive + 1) * found
        self.bad.zero_()
