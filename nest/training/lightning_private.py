"""Every use of Lightning's private API, each with why. Checked against pytorch-lightning 2.6.6; on an upgrade,
read these against Lightning's source again (tests/training cover each: logging cadence, SIGTERM broadcast on
logging steps, the loggers' step, the step checkpoint's last step, the DDP options)."""
from __future__ import annotations

from datetime import timedelta
from typing import Callable

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy


def should_log(trainer: pl.Trainer) -> bool:
    """Whether this batch is a logging step, by Lightning's own cadence (``_LoggerConnector.should_update_logs``:
    every ``log_every_n_steps`` batches, and when stopping). The step syncs with the device only then, and all
    ranks agree on it, so cross-rank requests are shared there too."""
    return trainer._logger_connector.should_update_logs


def broadcast_sigterm_on_logging_steps(trainer: pl.Trainer, is_logging_step: Callable[[], bool]) -> None:
    """Under DDP, Lightning (2.5+, ``_TrainingEpochLoop._broadcast_sigterm_tensor``, called from ``advance``)
    broadcasts rank 0's SIGTERM flag before every batch and reads it with ``.item()``: a collective and a host
    sync per step. Its purpose is that all ranks stop at the same step; doing it on logging steps only (a step
    count every rank agrees on, where the step syncs anyway) keeps that, stopping at most ``log_every_n_steps``
    later."""
    loop = trainer.fit_loop.epoch_loop
    every_step = getattr(loop, "_broadcast_sigterm_tensor", None)
    if every_step is None or getattr(every_step, "on_logging_steps", False):
        return

    def on_logging_steps() -> None:
        if is_logging_step():
            every_step()

    on_logging_steps.on_logging_steps = True
    loop._broadcast_sigterm_tensor = on_logging_steps


def log_numbers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Python numbers to every logger, at the step Lightning's own logging would use for values logged in this
    training step (``_LoggerConnector.log_metrics`` with no step: ``_batches_that_stepped``, with ``epoch``
    added), without ``LightningModule.log``'s tensor per value and ``.item()`` per value."""
    trainer._logger_connector.log_metrics(metrics)


def last_step_saved(checkpoint: ModelCheckpoint) -> int:
    """The global step of ``checkpoint``'s last save (``ModelCheckpoint._last_global_step_saved``): with
    ``save_last=True`` it also wrote last.ckpt then, which the end-of-training save must not repeat."""
    return getattr(checkpoint, "_last_global_step_saved", -1)


def configure_ddp(trainer: pl.Trainer, timeout: timedelta, **ddp_kwargs) -> None:
    """Options of the DistributedDataParallel wrapper and the process group's timeout, whichever DDP strategy
    Lightning chose (``auto`` on several devices, ``ddp`` or a registered alias such as
    ``ddp_find_unused_parameters_true``): ``DDPStrategy`` keeps them in ``_ddp_kwargs`` (passed to
    DistributedDataParallel in ``_setup_model``) and ``_timeout`` (read by ``setup_distributed``), both used
    only once ``fit`` starts. Other strategies are left as they are."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy._ddp_kwargs.update(ddp_kwargs)
        strategy._timeout = timeout
