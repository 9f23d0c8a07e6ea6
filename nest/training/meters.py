"""The run's numbers: totals of the whole run, this rank's counts, the logging window; reduced by name in one place.

Host counts (audio seconds, cuts, failures, data wait) cost nothing to keep; the loss sums and the objective's
metrics stay on the device. They cross ranks only at logging steps and when a checkpoint is written: one
all-reduce and one read on the host each time (``reduce``), the only device-to-host copy of a logging step
(the loggers get Python numbers, never a tensor to read back).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

import torch

from cuts.dataset import AudioNoiseBatch
from nest.errors import DataLoadError, NonFiniteLossError
from nest.training.distributed import all_reduce_, world_size


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
class Counts:
    """What this rank counted; summed over ranks by name."""

    audio_seconds: float = 0.0
    padded_seconds: float = 0.0
    cuts: int = 0
    failed_cuts: int = 0
    oom_retries: int = 0

    def add(self, other: "Counts") -> None:
        for f in fields(Counts):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Window(Counts):
    """This rank's counts since the last logging step."""

    data_wait: float = 0.0  # seconds the training loop waited for batches
    batches: int = 0
    first_failures: list = field(default_factory=list)  # (cut id, reason), a few
    started: float = field(default_factory=time.perf_counter)


@dataclass
class LogWindow:
    """One logging step's numbers, over all ranks."""

    metrics: dict[str, float]  # train/* as logged, Python numbers
    mean_loss: Optional[float]
    new_skips: int  # steps skipped since the previous logging step
    consecutive: int  # skipped steps in a row, up to now
    failed: int
    seen: int  # cuts of the window, loaded or not
    batches: int  # per rank
    first_failures: list
    data_wait_fraction: float = 0.0  # of the window's time, the training loop waited for batches (mean over ranks)
    step_seconds: float = 0.0  # the window's time per batch
    windows: int = 0  # logging windows of this process so far, this one included


def reduce(device: torch.device, host: dict[str, float], on_device: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum each named value over ranks: one all-reduce, one read on the host.

    The host numbers reach a CUDA device from pinned memory without blocking (a pageable copy would wait for
    the device), so the read at the end is the one wait."""
    values = torch.tensor(list(host.values()), dtype=torch.float64)
    values = [values.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else values.to(device)]
    if on_device:
        values.insert(0, torch.stack([v.detach().double() for v in on_device.values()]))
    summed = all_reduce_(torch.cat(values)).tolist()
    return dict(zip([*on_device, *host], summed))


class RunMeters:
    """Totals (``state_dict``), this rank's counts not yet in them (``pending``), the logging ``window``, and the
    device-side loss sums of the window."""

    def __init__(self):
        self.totals = RunTotals()
        self.pending = Counts()
        self.window = Window()
        self._loss: dict[str, torch.Tensor] = {}
        self._last_batch_end: Optional[float] = None
        self.windows = 0  # logging windows of this process

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.totals)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = RunTotals(**state)

    def start_window(self) -> None:
        """A new logging window from now: the first one does not count the start-up (set-up, checkpoint load)."""
        self.window, self._last_batch_end = Window(), None

    def batch_start(self) -> None:
        if self._last_batch_end is not None:
            self.window.data_wait += time.perf_counter() - self._last_batch_end

    def batch_end(self) -> None:
        self._last_batch_end = time.perf_counter()

    def add_batch(self, batch: AudioNoiseBatch, sample_rate: int, loss: torch.Tensor, finite: torch.Tensor,
                  weight: float, oom_retries: int) -> None:
        """Count one training batch (host numbers) and add its loss to the device sums."""
        total = batch.audio.shape[0] * batch.audio.shape[1] / sample_rate if len(batch) else 0.0
        counts = Counts(batch.audio_seconds, total - batch.audio_seconds, len(batch), batch.num_failed, oom_retries)
        self.pending.add(counts)
        self.window.add(counts)
        self.window.batches += 1
        self.window.first_failures.extend(batch.failed[: max(0, 5 - len(self.window.first_failures))])
        if not self._loss:
            self._loss = {"loss_sum": torch.zeros((), device=loss.device), "loss_n": torch.zeros((), device=loss.device)}
        self._loss["loss_sum"] += torch.where(finite, loss, 0.0) * weight
        self._loss["loss_n"] += finite.float() * weight

    def _fold(self, values: dict[str, float]) -> None:
        """Add the reduced pending counts to the totals; reset them."""
        t = self.totals
        t.audio_seconds += values["audio_seconds"]
        t.padded_seconds += values["padded_seconds"]
        t.cuts += int(values["cuts"])
        t.failed_cuts += int(values["failed_cuts"])
        t.oom_retries += int(values["oom_retries"])
        self.pending = Counts()

    def _take_loss(self, values: dict[str, float]) -> Optional[float]:
        for v in self._loss.values():
            v.zero_()
        if not values.get("loss_n"):
            return None
        t, mean = self.totals, values["loss_sum"] / values["loss_n"]
        t.first_loss = mean if t.first_loss is None else t.first_loss
        t.last_loss = mean
        return mean

    def log(self, device: torch.device, skipped: torch.Tensor, consecutive: torch.Tensor, lr: float,
            step_metrics: dict[str, torch.Tensor], weight: float) -> LogWindow:
        """A logging step (all ranks): the window's numbers over all ranks, folded into the totals; a new window.

        ``step_metrics`` (the objective's scalars of this step, on the device, the same names on every rank) are
        averaged over the ranks whose batch had ``weight`` 1 (a batch whose cuts all failed has 0)."""
        w, world = self.window, world_size()
        elapsed = max(time.perf_counter() - w.started, 1e-9)
        window = {f"window_{f.name}": getattr(w, f.name) for f in fields(Counts)}
        host = {**asdict(self.pending), **window, "data_wait": w.data_wait, "batches": w.batches,
                "metrics_weight": weight}
        metrics_sums = {f"train/{k}": weighted(v, weight) for k, v in step_metrics.items()}
        # skipped and consecutive are equal on every rank (found_inf was all-reduced): summed, then divided.
        v = reduce(device, host, {**self._loss, "skipped": skipped, "consecutive": consecutive, **metrics_sums})
        self._fold(v)
        mean_loss = self._take_loss(v)
        t = self.totals
        skipped_now = round(v["skipped"] / world)
        new_skips, t.skipped_steps = skipped_now - t.skipped_steps, skipped_now
        audio, padded = v["window_audio_seconds"], v["window_padded_seconds"]
        metrics = {
            "train/audio_seconds": audio, "train/failed_cuts": v["window_failed_cuts"],
            "train/skipped_steps": float(t.skipped_steps), "train/oom_retries": float(t.oom_retries),
            "train/padding_ratio": padded / max(audio + padded, 1e-9), "train/audio_s_per_s": audio / elapsed,
            "train/data_wait_s": v["data_wait"] / max(v["batches"], 1), "train/lr": lr,
        }
        if mean_loss is not None:
            metrics["train/loss"] = mean_loss
        if v["metrics_weight"]:
            metrics.update({k: v[k] / v["metrics_weight"] for k in metrics_sums})
        self.window = Window()
        self.windows += 1
        batches = int(v["batches"] / world)
        return LogWindow(metrics, mean_loss, new_skips, round(v["consecutive"] / world), int(v["window_failed_cuts"]),
                         int(v["window_cuts"] + v["window_failed_cuts"]), batches, w.first_failures,
                         data_wait_fraction=v["data_wait"] / world / elapsed, step_seconds=elapsed / max(batches, 1),
                         windows=self.windows)

    def fold(self, device: torch.device, skipped: torch.Tensor, with_loss: bool = False) -> None:
        """Add every rank's pending counts to the totals (a collective: called on all ranks), before a checkpoint
        is written; with ``with_loss`` (end of training) the window's mean loss too, so that a run shorter than
        one logging window, or ending between two, reports its last loss."""
        on_device = {**(self._loss if with_loss else {}), "skipped": skipped}
        v = reduce(device, asdict(self.pending), on_device)
        self._fold(v)
        if with_loss:
            self._take_loss(v)
        self.totals.skipped_steps = round(v["skipped"] / world_size())

    def summary(self, steps: int) -> dict[str, Any]:
        """What the run did, over all ranks and resumes: audio seen, padding, first and last loss."""
        t = self.totals
        total = t.audio_seconds + t.padded_seconds
        return {
            "steps": steps, "audio_hours_seen": t.audio_seconds / 3600,
            "padding_ratio": t.padded_seconds / total if total else None, "first_loss": t.first_loss,
            "last_loss": t.last_loss, "cuts_seen": t.cuts, "failed_cuts": t.failed_cuts,
            "skipped_steps": t.skipped_steps, "oom_retries": t.oom_retries,
        }


def weighted(value: torch.Tensor, weight: Union[float, torch.Tensor]) -> torch.Tensor:
    """``value * weight`` in float32; a weight of 0 (a number, or a tensor compared on the device without a host
    sync) also silences a nan or inf in ``value``: a batch that measures nothing adds nothing."""
    value = value.float()
    if isinstance(weight, torch.Tensor):
        return torch.where(weight > 0, value, torch.zeros_like(value)) * weight
    return value * weight if weight else torch.zeros_like(value)


DATA_WAIT_WARNING = 0.10  # of the step time, past which a run says once that data loading holds it up


def data_wait_warning(report: LogWindow, knobs: str) -> Optional[str]:
    """After warm-up (the first logging window: workers start, prefetch fills), the message for a window in which
    the training loop waited for data more than DATA_WAIT_WARNING of the time; None otherwise."""
    if report.windows < 2 or report.data_wait_fraction <= DATA_WAIT_WARNING:
        return None
    wait = report.data_wait_fraction * report.step_seconds
    return (f"the training step waited for data {report.data_wait_fraction:.0%} of the time over the last "
            f"{report.batches} steps ({wait * 1000:.0f} ms of each {report.step_seconds * 1000:.0f} ms step, "
            f"{report.metrics['train/audio_s_per_s']:.0f} audio-s/s): the dataloader workers do not keep up. "
            f"What feeds them faster: {knobs} (BENCHMARKS.md, data path per worker). Said once per run.")


def check_window(report: LogWindow, max_bad_steps: int, max_failed_fraction: float, step: int) -> None:
    """Stop the run (on every rank alike: the numbers are reduced) when too many steps in a row were skipped
    or too many cuts of the window failed to load."""
    if report.consecutive >= max_bad_steps:
        raise NonFiniteLossError(
            f"{report.consecutive} consecutive steps had a non-finite loss or gradient (last at step {step}); "
            f"stopping. The last good checkpoint is kept; lower optim.lr or check the data."
        )
    if report.seen and report.failed / report.seen > max_failed_fraction:
        named = "; ".join(f"{cid}: {why}" for cid, why in report.first_failures) or "(failures on other ranks)"
        raise DataLoadError(
            f"{report.failed} of the {report.seen} cuts of the last {report.batches} batches failed to load "
            f"(more than data.max_failed_fraction={max_failed_fraction}); first failures: {named}"
        )
