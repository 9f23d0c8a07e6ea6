"""Checkpoints taken where every rank agrees: on a timer, on SIGUSR1 (preemption), and at the end of training.

Lightning's own mechanisms do not fit a manually optimized, accumulating, multi-rank step: its
``ModelCheckpoint`` ignores ``train_time_interval`` under manual optimization, saves a step checkpoint again
after the first micro-batch of a resumed run, and saves the end of training only when nothing was saved
before; its SLURM handler saves from inside the signal handler, wherever each rank happens to be (between
the optimizer step and the commit of the data position, or inside a collective). Here a request (the timer
on rank 0, a signal on any rank) is shared on logging steps with one small all-reduce, and the
checkpoint is written by all ranks together at the end of an accumulation window, after the optimizer step
and the data position's commit: a resumed run continues exactly there.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from nest.training.lightning_private import last_step_saved

log = logging.getLogger(__name__)


SIGUSR1_RECEIVED = threading.Event()


def catch_sigusr1_early() -> None:
    """From the start of a run (its checks take a while): a SIGUSR1 is remembered instead of killing the process."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: SIGUSR1_RECEIVED.set())


class WindowEndCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving step checkpoints only at the end of an accumulation window."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.guard.between_windows:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class SaveOnRequest(Callback):
    """Writes ``last.ckpt`` every ``every_minutes`` (rank 0's clock), on SIGUSR1 (then requeues the SLURM job at
    once and stops training without a last validation: ``preempted``), and at the end of training when
    ``last.ckpt`` does not hold the last step. ``step_checkpoint`` is the ModelCheckpoint that also writes
    ``last.ckpt`` with each step checkpoint."""

    def __init__(self, last_path: Path, every_minutes: Optional[float], step_checkpoint: ModelCheckpoint):
        self.last_path = Path(last_path)
        self.every_s = every_minutes * 60 if every_minutes else None
        self.step_checkpoint = step_checkpoint
        self.signalled = False
        self.due = False
        self.preempted = False
        self.saved_step = -1  # of our own writes of last.ckpt (the same on every rank)
        self.last_save = time.monotonic()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.signalled |= SIGUSR1_RECEIVED.is_set()  # during start-up: acted on at the first logging step
        SIGUSR1_RECEIVED.clear()
        if threading.current_thread() is threading.main_thread():
            # Installed before Lightning's signal connector, which then leaves SIGUSR1 alone.
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # acted on at the next check: nothing else may run inside a signal handler

    def _last_step(self) -> int:
        # The step ModelCheckpoint (save_last=True) writes last.ckpt with each of its saves, on every rank's count.
        return max(self.saved_step, last_step_saved(self.step_checkpoint))

    def _save(self, trainer) -> None:
        # The full state (optimizer, loops, data position), as ModelCheckpoint saves it; said explicitly, or Lightning
        # logs "`weights_only` was not set" at every save. It holds plain data only and loads with weights_only=True.
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self.saved_step = trainer.global_step
        self.last_save = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.is_logging_step():  # the same batches on every rank, which wait on the device anyway
            timer = self.every_s is not None and trainer.is_global_zero and time.monotonic() - self.last_save >= self.every_s
            flags = torch.tensor([float(timer), float(self.signalled)], device=pl_module.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(flags)
            timer, signalled = (flags > 0).tolist()
            self.due |= timer or signalled
            if signalled and not self.preempted:
                self.preempted = True
                log.warning("SIGUSR1: saving at the end of this accumulation window, then stopping")
        if self.due and pl_module.guard.between_windows:
            self.due = False
            if self._last_step() != trainer.global_step:
                self._save(trainer)
            if self.preempted:
                if trainer.is_global_zero:
                    requeue_slurm_job()  # now: the time left before SLURM kills the job is short
                trainer.limit_val_batches = 0  # no validation round on the way out
                trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_step() != trainer.global_step:
            self._save(trainer)


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (after a SIGUSR1 stop, from rank 0); it resumes with resume=auto."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job:
        log.warning("stopped on SIGUSR1 outside SLURM: start again with resume=auto")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue SLURM job %s (%s): resubmit it with resume=auto", job, e)
        return
    if result.returncode:
        log.error("scontrol requeue %s failed: %s; resubmit it with resume=auto", job, result.stderr.strip())
    else:
        log.warning("SLURM job %s requeued; it resumes from %s", job, "last.ckpt")
