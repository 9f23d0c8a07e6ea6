"""The one LightningModule: a shared step for training and validation, metrics, optimizer, guards.

Optimisation is manual (Lightning's manual optimization) so that a step is exact and never waits on the
accelerator outside logging steps (`trainer.log_every_n_steps`):
- A non-finite loss or gradient skips the optimizer step on the device: the fused AdamW kernel receives
  ``found_inf`` as GradScaler hands it over, and leaves parameters, moments and its step count untouched.
  The flag is all-reduced (max) over ranks, so every replica skips together; BatchNorm statistics of any
  kind (BatchNorm1d, SyncBatchNorm) touched by a non-finite forward pass are put back. How many steps were
  skipped is read on the host only at logging steps (and checked against ``max_bad_steps`` there).
- Gradient accumulation is ours (``accumulate_grad_batches``): the backward passes of a window but the
  last run under DDP's ``no_sync``, so each window costs one gradient all-reduce, and the skip decision
  covers the whole window on every rank.
- A batch whose every cut failed to load arrives as one second of silence with no cut ids: it runs
  forward and backward with weight 0, so every rank takes part in every collective.
- A step that runs out of accelerator memory is retried as two half batches and counted. Under DDP a
  retry is only safe when nothing collective ran yet: an out-of-memory error in the forward pass of a
  model without SyncBatchNorm; otherwise the run stops with a message (resume=auto continues it).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from cuts.dataset import AudioNoiseBatch
from nest.checkpoint import build_model, model_config_from_dict
from nest.config import ModelConfig, OptimConfig
from nest.model import noam_lambda
from nest.train_state import (
    DataLoadError,
    NonFiniteLossError,
    RunTotals,
    StepOptions,
    Window,
    all_reduce_,
    batch_torch_seed,
    norm_buffers,
    world_size,
)

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
        self.totals = RunTotals()
        self._window = Window()
        self._micro = 0  # micro-batches done in the current accumulation window
        self._norm_buffers: list[torch.Tensor] = []
        self._state: dict[str, torch.Tensor] = {}  # device-side flags and sums, see _device_state
        self._last_batch_end: Optional[float] = None

    # ---- batches -----------------------------------------------------------------------------------
    def forward(self, batch: AudioNoiseBatch):
        extra = {} if batch.targets is None else {"targets": batch.targets}
        return self.model(batch.audio, batch.audio_lens, batch.noisy_audio, batch.audio_lens, **extra)

    def on_fit_start(self) -> None:
        if self.model_cfg.compile:  # after the move to the device; DDP wraps the module, the encoder compiles inside
            self.model.compile_encoder()

    def on_train_start(self) -> None:
        # After the strategy's set-up, which may have converted BatchNorm layers to SyncBatchNorm.
        self._norm_buffers = norm_buffers(self.model)
        self._window = Window()
        self._sigterm_check_on_logging_steps()

    def _sigterm_check_on_logging_steps(self) -> None:
        """Under DDP, Lightning (2.5+, ``_TrainingEpochLoop.advance``) broadcasts rank 0's SIGTERM flag before
        every batch and reads it with ``.item()``: a collective and a host sync per step. Its purpose is
        that all ranks stop at the same step; doing it on logging steps only (a step count every rank
        agrees on, where the step syncs anyway) keeps that, stopping at most ``log_every_n_steps`` later."""
        loop = self.trainer.fit_loop.epoch_loop
        every_step = getattr(loop, "_broadcast_sigterm_tensor", None)
        if every_step is None or getattr(every_step, "on_logging_steps", False):
            return

        def on_logging_steps() -> None:
            if self._should_log():
                every_step()

        on_logging_steps.on_logging_steps = True
        loop._broadcast_sigterm_tensor = on_logging_steps

    def _device_state(self) -> dict[str, torch.Tensor]:
        if not self._state or next(iter(self._state.values())).device != self.device:
            z = lambda dtype=torch.float32: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
            self._state = {"bad": z(torch.bool), "loss_sum": z(), "loss_n": z(), "skipped": z(), "consecutive": z(),
                           "one": z() + 1}
            self._state["skipped"] += self.totals.skipped_steps
        return self._state

    def _should_log(self) -> bool:
        return self.trainer._logger_connector.should_update_logs  # Lightning's own cadence for this batch

    # ---- training ----------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: AudioNoiseBatch, batch_idx: int) -> None:
        if self._last_batch_end is not None:
            self._window.data_wait += time.perf_counter() - self._last_batch_end
        # Masks, dither and dropout draw from torch's generators, seeded per batch and rank: a resumed
        # run draws exactly what the uninterrupted one did, and ranks draw differently.
        torch.manual_seed(batch_torch_seed(self.seed, self.global_rank, batch.epoch, batch.index, batch.worker))

    def training_step(self, batch: AudioNoiseBatch, batch_idx: int) -> None:
        s = self._device_state()
        self.model.set_num_updates(self.global_step)  # w2vbert's Gumbel temperature follows the step
        A = self.step_cfg.accumulate_grad_batches
        self._micro += 1
        last = self._micro == A
        weight = 1.0 if len(batch) else 0.0
        saved = [b.clone() for b in self._norm_buffers]
        no_sync = contextlib.nullcontext() if last else self._no_sync()
        with no_sync:
            loss, out = self._forward_backward(batch, weight / A, last)
        self.last_loss = loss  # (device) read by tests' traces, never by the step
        finite = torch.isfinite(loss)
        for buffer, old in zip(self._norm_buffers, saved):
            buffer.copy_(torch.where(finite, buffer, old))
        s["bad"] |= ~finite
        s["loss_sum"] += torch.where(finite, loss, 0.0) * weight
        s["loss_n"] += finite.float() * weight
        self._count_batch(batch)
        if last:
            self._optimizer_step()
            self._micro = 0
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "batch_done"):
            # After the optimizer step: a checkpoint taken now resumes after this accumulation window.
            dm.batch_done(batch, window_end=last)
        if self._should_log():
            self._log_train(out)

    def _no_sync(self):
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if hasattr(strategy, "block_backward_sync") else contextlib.nullcontext()

    def _forward_backward(self, batch: AudioNoiseBatch, weight: float, last: bool):
        """Forward and backward of ``batch`` (its loss scaled by ``weight``); retried as two halves when the
        accelerator runs out of memory. Returns the detached loss and the model output."""
        stage = "forward"
        try:
            out = self(batch)
            stage = "backward"
            self.manual_backward(out.loss * weight)
            return out.loss.detach(), out
        except torch.OutOfMemoryError as e:
            out = None
            self._check_retry_is_safe(stage, batch, e)
        if stage == "backward":  # the first of its window (else refused above): drop its partial gradients
            self.optimizers().zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._window.oom_retries += 1
        halves = [h for h in batch.split() if h.audio.shape[0]]
        log.warning("out of memory in the %s pass of a batch of %d x %.1f s: retrying it as two halves", stage,
                    batch.audio.shape[0], batch.audio.shape[1] / self.model_cfg.preprocessor.sample_rate)
        total = sum(h.audio.shape[0] for h in halves)
        losses, out = [], None
        for i, half in enumerate(halves):
            share = half.audio.shape[0] / total  # the halves are weighted by their utterances
            sync = self._no_sync() if last and i < len(halves) - 1 else contextlib.nullcontext()
            with sync:
                out = self(half)
                self.manual_backward(out.loss * weight * share)
            losses.append(out.loss.detach() * share)
        return torch.stack(losses).sum(), out

    def _check_retry_is_safe(self, stage: str, batch: AudioNoiseBatch, error: Exception) -> None:
        distributed = world_size() > 1
        sync_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.model.modules())
        partial_grads = stage == "backward" and self._micro > 1
        if batch.audio.shape[0] < 2:
            raise RuntimeError(
                f"out of memory on a single utterance of {batch.audio.shape[1] / self.model_cfg.preprocessor.sample_rate:.1f} s "
                f"(nothing to split): lower data.max_duration, and continue with resume=auto") from error
        if distributed and (stage == "backward" or sync_bn) or partial_grads:
            raise RuntimeError(
                f"out of memory in the {stage} pass of a batch of {batch.audio.shape[0]} utterances x "
                f"{batch.audio.shape[1] / self.model_cfg.preprocessor.sample_rate:.1f} s, where a retry cannot "
                f"be made safely ({'DDP collectives already ran' if distributed else 'gradients of the window are mixed'}): "
                f"lower data.batch_duration or the calibrated batch sizes (prepare.py calibrate --memory-fraction) "
                f"and continue with resume=auto"
            ) from error

    def _optimizer_step(self) -> None:
        s = self._device_state()
        opt = self.optimizers()
        found = s["bad"].float()
        grads: dict[tuple, list[torch.Tensor]] = {}
        for p in self.model.parameters():
            if p.grad is not None:
                grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for group in grads.values():  # found |= any non-finite gradient, on the device (GradScaler's kernel)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, s["one"])
        all_reduce_(found, torch.distributed.ReduceOp.MAX)  # every rank skips together
        if self.step_cfg.gradient_clip_val > 0:
            self.clip_gradients(opt, gradient_clip_val=self.step_cfg.gradient_clip_val, gradient_clip_algorithm="norm")
        torch_opt = opt.optimizer
        torch_opt.found_inf = found  # read by the fused AdamW kernel: skip the update where it is 1
        try:
            opt.step()
        finally:
            del torch_opt.found_inf
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        s["skipped"] += found
        s["consecutive"] = (s["consecutive"] + 1) * found
        s["bad"].zero_()

    def _count_batch(self, batch: AudioNoiseBatch) -> None:
        w = self._window
        sr = self.model_cfg.preprocessor.sample_rate
        total = batch.audio.shape[0] * batch.audio.shape[1] / sr if len(batch) else 0.0
        w.audio_seconds += batch.audio_seconds
        w.window_audio += batch.audio_seconds
        w.padded_seconds += total - batch.audio_seconds
        w.cuts += len(batch)
        w.failed += batch.num_failed
        w.window_cuts += len(batch)
        w.window_failed += batch.num_failed
        w.batches += 1
        w.first_failures.extend(batch.failed[: max(0, 5 - len(w.first_failures))])

    def on_train_batch_end(self, outputs, batch: AudioNoiseBatch, batch_idx: int) -> None:
        self._last_batch_end = time.perf_counter()

    def _log_train(self, out) -> None:
        """Logging step: one all-reduce of this window's numbers, one read on the host, then checks."""
        s, w = self._device_state(), self._window
        elapsed = max(time.perf_counter() - w.started, 1e-9)
        world = world_size()
        host = torch.tensor([w.audio_seconds, w.padded_seconds, w.cuts, w.failed, w.oom_retries, w.data_wait, w.batches,
                             w.window_audio, w.window_cuts, w.window_failed], dtype=torch.float64, device=self.device)
        # skipped and consecutive are equal on every rank (found_inf was all-reduced): summed, then divided.
        packed = torch.cat([torch.stack([s["loss_sum"], s["loss_n"], s["skipped"], s["consecutive"]]).double(), host])
        (loss_sum, loss_n, skipped, consecutive, audio, padded, cuts, failed, ooms, wait, batches, window_audio,
         window_cuts, window_failed) = \
            all_reduce_(packed).tolist()  # the one host sync of a logging step
        skipped, consecutive = round(skipped / world), round(consecutive / world)
        t = self.totals
        t.audio_seconds += audio
        t.padded_seconds += padded
        t.cuts += int(cuts)
        t.failed_cuts += int(failed)
        t.oom_retries += int(ooms)
        new_skips = int(skipped) - t.skipped_steps
        t.skipped_steps = int(skipped)
        mean_loss = loss_sum / loss_n if loss_n else None
        if mean_loss is not None:
            t.first_loss = mean_loss if t.first_loss is None else t.first_loss
            t.last_loss = mean_loss
        metrics = {
            "train/audio_seconds": window_audio, "train/failed_cuts": window_failed, "train/skipped_steps": float(t.skipped_steps),
            "train/oom_retries": float(t.oom_retries), "train/padding_ratio": padded / max(audio + padded, 1e-9),
            "train/audio_s_per_s": window_audio / elapsed, "train/data_wait_s": wait / max(batches, 1),
            "train/lr": self.lr_schedulers().get_last_lr()[0],
        }
        if mean_loss is not None:
            metrics["train/loss"] = mean_loss
        if len(out.encoded_lens) and hasattr(self.model, "metrics"):
            metrics.update({f"train/{k}": v for k, v in self.model.metrics(out).items()})
        self.log_dict(metrics, batch_size=1)
        # Python numbers for the progress bar (nest.run's ProgressBar): values logged with prog_bar=True would be
        # read back with .item() by Lightning after every batch, a host sync per step.
        self.progress = {"loss": "n/a" if mean_loss is None else f"{mean_loss:.3f}",
                         "audio_s/s": f"{window_audio / elapsed:.0f}"}
        if self.trainer.progress_bar_callback is None and self.global_rank == 0:  # e.g. batch jobs: a log line
            log.info("step %d: loss %s, %s audio-s/s, %d skipped steps", self.global_step, self.progress["loss"],
                     self.progress["audio_s/s"], t.skipped_steps)
        s["loss_sum"].zero_()
        s["loss_n"].zero_()
        failures, self._window = w.first_failures, Window()
        if new_skips:
            log.warning("%d steps skipped for a non-finite loss or gradient since the last log (%d in all)",
                        new_skips, t.skipped_steps)
        if consecutive >= self.step_cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"{int(consecutive)} consecutive steps had a non-finite loss or gradient (last at step "
                f"{self.global_step}); stopping. The last good checkpoint is kept; lower optim.lr or check the data."
            )
        seen = window_cuts + window_failed
        if seen and window_failed / seen > self.step_cfg.max_failed_fraction:
            named = "; ".join(f"{cid}: {why}" for cid, why in failures) or "(failures on other ranks)"
            raise DataLoadError(
                f"{int(window_failed)} of the {int(seen)} cuts of the last {int(batches / world)} batches failed to load "
                f"(more than data.max_failed_fraction={self.step_cfg.max_failed_fraction}); first failures: {named}"
            )

    # ---- validation --------------------------------------------------------------------------------
    def on_validation_model_zero_grad(self) -> None:
        """Lightning clears gradients before validating; ours are clear at window ends already, and must not be
        cleared in the middle of one."""

    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, torch.Tensor] = {}

    def validation_step(self, batch: AudioNoiseBatch, batch_idx: int):
        # A batch whose cuts all failed holds silence and weighs 0, but runs: every rank must reach the
        # reduction of on_validation_epoch_end with the same metric names.
        weight = float(len(batch))
        # Seeded masks: validation loss compares across runs and across validation rounds.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.val_seed + batch_idx)
            out = self(batch)
        metrics = {"loss": out.loss.detach()}
        if hasattr(self.model, "metrics"):
            metrics.update(self.model.metrics(out))
        sums = self._val_sums
        for k, v in metrics.items():  # weighted by cuts, kept on the device
            v = torch.nan_to_num(v.float(), nan=0.0, posinf=0.0, neginf=0.0) if not weight else v.float()
            sums[k] = sums.get(k, torch.zeros((), device=self.device)) + v * weight
        sums["_cuts"] = sums.get("_cuts", torch.zeros((), device=self.device)) + weight
        return None

    def on_validation_epoch_end(self) -> None:
        """One all-reduce of every rank's sums (so a rank without a loadable cut neither hangs nor crashes
        the others), then the same numbers logged on every rank."""
        sums = getattr(self, "_val_sums", {})
        if not sums:
            return
        names = sorted(sums)
        total = dict(zip(names, all_reduce_(torch.stack([sums[k] for k in names])).tolist()))
        cuts = total.pop("_cuts")
        if not cuts:
            log.warning("validation: no cut could be loaded on any rank; val_loss is reported as inf")
        values = {k: (v / cuts if cuts else math.inf) for k, v in total.items()}
        self.log_dict({f"val/{k}": v for k, v in values.items()}, batch_size=1)
        self.log("val_loss", values["loss"], prog_bar=True, batch_size=1)

    # ---- optimizer, checkpoints, summary -------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Fused: one kernel per step, and the only AdamW that takes found_inf (a skip decided on the device).
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, noam_lambda(self.model_cfg.encoder.d_model, o.warmup_steps, o.lr, o.min_lr)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _sync_totals(self, with_loss: bool = False) -> None:
        """Add every rank's unlogged window to the run totals (a collective: called on all ranks); with
        ``with_loss`` (end of training) its mean loss too, so that a run shorter than one logging window,
        or ending between two, reports its last loss."""
        w, s = self._window, self._state
        d = torch.tensor([w.audio_seconds, w.padded_seconds, w.cuts, w.failed, w.oom_retries], dtype=torch.float64,
                         device=self.device)
        if with_loss and s:
            d = torch.cat([d, torch.stack([s["loss_sum"], s["loss_n"]]).double()])
        values = all_reduce_(d).tolist()
        audio, padded, cuts, failed, ooms = values[:5]
        t = self.totals
        t.audio_seconds += audio
        t.padded_seconds += padded
        t.cuts += int(cuts)
        t.failed_cuts += int(failed)
        t.oom_retries += int(ooms)
        if len(values) == 7 and values[6]:
            t.last_loss = values[5] / values[6]
            t.first_loss = t.last_loss if t.first_loss is None else t.first_loss
            s["loss_sum"].zero_()
            s["loss_n"].zero_()
        if self._state:
            t.skipped_steps = round(self._state["skipped"].item())
        self._window = Window(started=w.started, data_wait=w.data_wait, batches=w.batches, window_audio=w.window_audio,
                               window_cuts=w.window_cuts, window_failed=w.window_failed, first_failures=w.first_failures)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._sync_totals()
        checkpoint["nest_totals"] = asdict(self.totals)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.totals = RunTotals(**checkpoint.get("nest_totals", {}))
        self._state = {}  # rebuilt from the totals on the next step

    def on_train_end(self) -> None:
        self._sync_totals(with_loss=True)

    def summary(self) -> dict[str, Any]:
        """What the run did, over all ranks and resumes: audio seen, padding, first and last loss."""
        t = self.totals
        total = t.audio_seconds + t.padded_seconds
        return {
            "steps": int(self.global_step),
            "audio_hours_seen": t.audio_seconds / 3600,
            "padding_ratio": t.padded_seconds / total if total else None,
            "first_loss": t.first_loss,
            "last_loss": t.last_loss,
            "cuts_seen": t.cuts,
            "failed_cuts": t.failed_cuts,
            "skipped_steps": t.skipped_steps,
            "oom_retries": t.oom_retries,
        }


def make_module(model_cfg: ModelConfig, optim_cfg: OptimConfig, step: StepOptions, seed: int) -> NestLightningModule:
    return NestLightningModule(asdict(model_cfg), asdict(optim_cfg), asdict(step), seed=seed)
