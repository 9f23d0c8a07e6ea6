"""The one LightningModule: it connects Lightning's hooks to the guarded step (nest.training.step), the run's
meters (nest.training.meters) and the data position (nest.training.data).

Optimisation is manual (Lightning's manual optimization) so that a step is exact and never waits on the
accelerator outside logging steps (``trainer.log_every_n_steps``), where one all-reduce and one read on the
host serve every logged number.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ParallelStrategy

from cuts.dataset import AudioNoiseBatch
from cuts.feed import data_knobs
from nest.config.schema import OptimConfig
from nest.objectives import build_model
from nest.objectives.config import ModelConfig, model_config_from_dict
from nest.training import lightning_private
from nest.training.distributed import all_reduce_
from nest.training.meters import RunMeters, check_window, data_wait_warning, weighted
from nest.training.optim import make_optimizer
from nest.training.step import GuardedStep, StepOptions, batch_torch_seed, forward_batch

log = logging.getLogger(__name__)


class NestLightningModule(pl.LightningModule):
    def __init__(self, model_config: dict, optim_config: dict, step_config: Optional[dict] = None, seed: int = 0,
                 val_seed: int = 0):
        super().__init__()
        # Plain dicts, so that checkpoints load with weights_only=True.
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model_cfg: ModelConfig = model_config_from_dict(model_config)
        self.optim_cfg = OptimConfig(**optim_config)
        self.step_cfg = StepOptions(**(step_config or {}))
        self.model = build_model(self.model_cfg)
        self.seed, self.val_seed = seed, val_seed
        self.meters = RunMeters()
        self.guard: Optional[GuardedStep] = None  # built once the strategy has set the model up
        self.progress: dict[str, str] = {}  # the progress bar's numbers, on the host, set on logging steps
        self._val_sums: dict[str, torch.Tensor] = {}  # weighted by cuts, on the device, over a validation round
        self._warned_data_wait = False

    def forward(self, batch: AudioNoiseBatch):
        return forward_batch(self.model, batch)

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.model, self.optim_cfg, self.model_cfg.encoder.d_model)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        if self.model_cfg.compile:  # after the move to the device; DDP wraps the module, the encoder compiles inside
            self.model.compile_encoder()

    def on_train_start(self) -> None:
        # After the strategy's set-up, which may have converted BatchNorm layers to SyncedBatchNorm.
        opt, strategy = self.optimizers(), self.trainer.strategy
        no_sync = strategy.block_backward_sync if isinstance(strategy, ParallelStrategy) else None
        self.guard = GuardedStep(self.model, opt.optimizer, self.lr_schedulers(), self.step_cfg,
                                 backward=self.manual_backward, no_sync=no_sync, optimizer_step=opt.step,
                                 skipped=self.meters.totals.skipped_steps)
        self.trainer.datamodule.noise_bank(self.device)  # decoded before the first step, on every rank alike
        self.meters.start_window()
        lightning_private.broadcast_sigterm_on_logging_steps(self.trainer, self.is_logging_step)

    def is_logging_step(self) -> bool:
        return lightning_private.should_log(self.trainer)

    # ---- training ----------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: AudioNoiseBatch, batch_idx: int) -> None:
        self.meters.batch_start()
        # Masks, dither and dropout draw from torch's generators, seeded per batch and rank: a resumed
        # run draws exactly what the uninterrupted one did, and ranks draw differently.
        torch.manual_seed(batch_torch_seed(self.seed, self.global_rank, batch.epoch, batch.index, batch.worker))

    def training_step(self, batch: AudioNoiseBatch, batch_idx: int) -> None:
        self.model.set_num_updates(self.global_step)  # w2vbert's Gumbel temperature follows the step
        # On the device: 16-bit audio to float32, and the interference of data.mix_on_device (from the noise bank).
        batch = batch.prepared(self.trainer.datamodule.noise_bank(self.device) if batch.mix is not None else None)
        done = self.guard(batch, self)
        self.last_loss = done.loss  # (device) read by tests' traces, never by the step
        # A batch with nothing masked has no loss (its 0 would read as a perfect step in the logged mean).
        counted = done.finite & self.model.has_loss(done.out)
        self.meters.add_batch(batch, self.model_cfg.preprocessor.sample_rate, done.loss, counted, done.weight,
                              done.oom_retries)
        # After the optimizer step: a checkpoint taken now resumes after this accumulation window.
        self.trainer.datamodule.batch_done(batch, window_end=done.window_end)
        if self.is_logging_step():
            self._log_window(done.out, done.weight)

    def on_train_batch_end(self, outputs, batch: AudioNoiseBatch, batch_idx: int) -> None:
        self.meters.batch_end()

    def _log_window(self, out, weight: float) -> None:
        """Logging step: one all-reduce of the window's numbers and this step's metrics, one read on the host, then
        the checks. The loggers get the Python numbers directly: ``self.log`` would turn each into a tensor on the
        device and read it back, a host sync per number."""
        g = self.guard
        report = self.meters.log(self.device, g.skipped, g.consecutive, self.lr_schedulers().get_last_lr()[0],
                                 self.model.metrics(out), weight)
        metrics = report.metrics
        lightning_private.log_numbers(self.trainer, metrics)
        # Python numbers for the progress bar (nest.training.run's ProgressBar): values logged with prog_bar=True
        # would be read back with .item() by Lightning after every batch, a host sync per step.
        self.progress = {"loss": "n/a" if report.mean_loss is None else f"{report.mean_loss:.3f}",
                         "audio_s/s": f"{metrics['train/audio_s_per_s']:.0f}"}
        if self.trainer.progress_bar_callback is None and self.global_rank == 0:  # e.g. batch jobs: a log line
            log.info("step %d: loss %s, %s audio-s/s, %d skipped steps", self.global_step, self.progress["loss"],
                     self.progress["audio_s/s"], self.meters.totals.skipped_steps)
        if report.new_skips:
            log.warning("%d steps skipped for a non-finite loss or gradient since the last log (%d in all)",
                        report.new_skips, self.meters.totals.skipped_steps)
        check_window(report, self.step_cfg.max_bad_steps, self.step_cfg.max_failed_fraction, self.global_step)
        if not self._warned_data_wait:
            message = data_wait_warning(report, data_knobs(self.trainer.datamodule.feed))
            if message is not None:
                self._warned_data_wait = True
                if self.global_rank == 0:
                    log.warning(message)

    # ---- validation --------------------------------------------------------------------------------
    def on_validation_model_zero_grad(self) -> None:
        """Lightning clears gradients before validating; ours are clear at window ends already, and must not be
        cleared in the middle of one."""

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def on_validation_end(self) -> None:
        # Lightning validates after on_train_batch_end: the round is not time the next batch waited for data.
        self.meters.batch_end()

    def validation_step(self, batch: AudioNoiseBatch, batch_idx: int):
        # A batch whose cuts all failed holds silence and weighs 0, but runs: every rank must reach the
        # reduction of on_validation_epoch_end with the same metric names.
        weight = float(len(batch))
        batch = batch.prepared()  # validation noise is mixed in the workers
        # Seeded masks: validation loss compares across runs and across validation rounds.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.val_seed + batch_idx)
            out = self(batch)
        # A batch with nothing masked has no loss: its 0 stays out of val_loss (and of the choice of best.ckpt), and
        # out of the metrics measured over masked frames.
        counted = weight * self.model.has_loss(out).float()
        per_mask = self.model.masked_metrics
        metrics = {"loss": (out.loss.detach(), counted),
                   **{k: (v, counted if k in per_mask else weight) for k, v in self.model.metrics(out).items()}}
        sums = self._val_sums
        for k, (v, w) in metrics.items():  # weighted by cuts, kept on the device
            sums[k] = sums.get(k, torch.zeros((), device=self.device)) + weighted(v, w)
        sums["_cuts"] = sums.get("_cuts", torch.zeros((), device=self.device)) + weight
        sums["_loss_cuts"] = sums.get("_loss_cuts", torch.zeros((), device=self.device)) + counted

    def on_validation_epoch_end(self) -> None:
        """One all-reduce of every rank's sums (so a rank without a loadable cut neither hangs nor crashes
        the others), then the same numbers logged on every rank."""
        sums = self._val_sums
        if not sums:
            return
        names = sorted(sums)
        total = dict(zip(names, all_reduce_(torch.stack([sums[k] for k in names])).tolist()))
        cuts, loss_cuts = total.pop("_cuts"), total.pop("_loss_cuts")
        if not cuts:
            log.warning("validation: no cut could be loaded on any rank; val_loss is reported as inf")
        elif not loss_cuts:
            log.warning("validation: no frame of the %d validation cuts was masked (short cuts against "
                        "model.masking.block_size and mask_prob): val_loss is reported as inf, and best.ckpt is not "
                        "chosen by it; give longer validation cuts", round(cuts))
        per_mask = self.model.masked_metrics
        values = {k: (v / n if (n := loss_cuts if k in per_mask else cuts) else math.nan) for k, v in total.items()}
        values["loss"] = total["loss"] / loss_cuts if loss_cuts else math.inf  # never the best
        self.log_dict({f"val/{k}": v for k, v in values.items()}, batch_size=1)
        self.log("val_loss", values["loss"], prog_bar=True, batch_size=1)
        if self.trainer.progress_bar_callback is None and self.global_rank == 0:  # batch logs: a line, as for steps
            log.info("validation at step %d: val_loss %.3f over %d cuts", self.global_step, values["loss"], round(cuts))

    # ---- checkpoints and summary --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.meters.fold(self.device, self.guard.skipped)
        checkpoint["nest_totals"] = self.meters.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.meters.load_state_dict(checkpoint.get("nest_totals", {}))

    def on_train_end(self) -> None:
        self.meters.fold(self.device, self.guard.skipped, with_loss=True)

    def summary(self) -> dict[str, Any]:
        """What the run did, over all ranks and resumes: audio seen, padding, first and last loss."""
        return self.meters.summary(int(self.global_step))


def make_module(model_cfg: ModelConfig, optim_cfg: OptimConfig, step: StepOptions, seed: int) -> NestLightningModule:
    return NestLightningModule(asdict(model_cfg), asdict(optim_cfg), asdict(step), seed=seed)
