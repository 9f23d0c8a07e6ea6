"""The one LightningModule: a shared step for training and validation, metrics, optimizer, guards."""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Optional

import pytorch_lightning as pl
import torch

from cuts.dataset import AudioNoiseBatch
from nest.checkpoint import model_config_from_dict
from nest.config import ModelConfig, OptimConfig
from nest.model import NestModel, NestOutput, noam_lambda


def batch_torch_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    """The torch seed for one training batch on one rank."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 15_485_863 + index * 104_729) % 2**63


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


def codebook_perplexity(tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """exp(entropy) of the target-token histogram, averaged over codebooks: how many codes are in use."""
    flat = tokens.reshape(-1, tokens.shape[-1])  # (B*T', N)
    counts = torch.stack([torch.bincount(flat[:, n], minlength=num_classes) for n in range(flat.shape[1])]).float()
    p = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum(-1)).mean()


class NestLightningModule(pl.LightningModule):
    def __init__(self, model_config: dict, optim_config: dict, max_bad_steps: int = 20, seed: int = 0,
                 val_seed: int = 0):
        super().__init__()
        # Plain dicts, so that checkpoints load with weights_only=True.
        self.save_hyperparameters()
        self.model_cfg: ModelConfig = model_config_from_dict(model_config)
        self.optim_cfg = OptimConfig(**optim_config)
        self.model = NestModel(self.model_cfg)
        self.max_bad_steps = max_bad_steps
        self.seed = seed
        self.val_seed = val_seed
        self.bad_steps = 0
        self.skipped_steps = 0
        self.audio_seconds = 0.0
        self.padded_seconds = 0.0
        self.loss_history: list[float] = []
        self._last_time: Optional[float] = None
        self._data_wait = 0.0

    def forward(self, batch: AudioNoiseBatch) -> NestOutput:
        return self.model(batch.audio, batch.audio_lens, batch.noisy_audio, batch.noisy_audio_lens)

    def shared_step(self, batch: AudioNoiseBatch, stage: str) -> tuple[torch.Tensor, dict]:
        out = self(batch)
        sel = out.token_mask[:, : out.log_probs.shape[1]]
        with torch.no_grad():
            pred = out.log_probs.argmax(2)  # (B, T', N)
            correct = (pred == out.tokens[:, : pred.shape[1]])[sel]
            sr = self.model_cfg.preprocessor.sample_rate
            audio_s = batch.audio_lens.sum().item() / sr
            total_s = batch.audio.shape[0] * batch.audio.shape[1] / sr
            valid_frames = (torch.arange(out.frame_mask.shape[1], device=self.device)[None]
                            < self.model.preprocessor.num_frames(batch.noisy_audio_lens)[:, None])
            metrics = {
                f"{stage}/loss": out.loss.detach(),
                f"{stage}/masked_accuracy": correct.float().mean() if correct.numel() else torch.tensor(0.0),
                f"{stage}/target_perplexity": codebook_perplexity(out.tokens, self.model_cfg.quantizer.num_classes),
                f"{stage}/masked_fraction": (out.frame_mask & valid_frames).sum() / valid_frames.sum().clamp(min=1),
                f"{stage}/padding_ratio": torch.tensor(1.0 - audio_s / max(total_s, 1e-9)),
            }
        return out.loss, {"audio_s": audio_s, "total_s": total_s, "metrics": metrics}

    def on_train_batch_start(self, batch: AudioNoiseBatch, batch_idx: int) -> None:
        if self._last_time is not None:
            self._data_wait = time.perf_counter() - self._last_time
        # Masks, dither and dropout draw from torch's generators, seeded per batch and rank: a resumed
        # run draws exactly what the uninterrupted one did, and ranks draw differently.
        torch.manual_seed(batch_torch_seed(self.seed, self.global_rank, batch.epoch, batch.index))
        # Marked before the step: Lightning saves step checkpoints at the end of the batch, in callback
        # hooks that run before this module's on_train_batch_end.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "mark_consumed"):
            dm.mark_consumed(batch.epoch, batch.index)

    def training_step(self, batch: AudioNoiseBatch, batch_idx: int):
        start = time.perf_counter()
        if len(batch) == 0:
            return None  # every cut of the batch failed to load; already counted
        # A non-finite forward pass would poison BatchNorm's running statistics even when the step is
        # skipped: keep a copy of them (a few KB) to put back.
        norm_stats = [(b, b.clone()) for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm1d)
                      for b in m.buffers()]
        loss, info = self.shared_step(batch, "train")
        finite = torch.isfinite(loss).float()
        finite = self.trainer.strategy.reduce(finite, reduce_op="min") if self.trainer.world_size > 1 else finite
        if finite.item() < 1:
            # Skip on every rank together, so that DDP never waits for a gradient that will not come.
            for buffer, saved in norm_stats:
                buffer.copy_(saved)
            self.bad_steps += 1
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps))
            if self.bad_steps >= self.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_steps} consecutive steps had a non-finite loss (last at step {self.global_step}); "
                    f"stopping. The last good checkpoint is kept; lower optim.lr or check the data."
                )
            return None
        self.bad_steps = 0
        self.audio_seconds += info["audio_s"]
        self.padded_seconds += info["total_s"] - info["audio_s"]
        self.loss_history.append(loss.item())
        m = info["metrics"]
        m["train/audio_s_per_s"] = torch.tensor(info["audio_s"] / max(time.perf_counter() - start + self._data_wait, 1e-9))
        m["train/data_wait_s"] = torch.tensor(self._data_wait)
        m["train/failed_cuts"] = torch.tensor(float(batch.num_failed))
        m["train/lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict(m, prog_bar=False, batch_size=len(batch))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=len(batch))
        self.log("audio_s/s", m["train/audio_s_per_s"], prog_bar=True, logger=False, batch_size=len(batch))
        return loss

    def on_train_batch_end(self, outputs, batch: AudioNoiseBatch, batch_idx: int) -> None:
        self._last_time = time.perf_counter()

    def validation_step(self, batch: AudioNoiseBatch, batch_idx: int):
        if len(batch) == 0:
            return None
        # Seeded masks: validation loss compares across runs and across validation rounds.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.val_seed + batch_idx)
            loss, info = self.shared_step(batch, "val")
        m = info["metrics"]
        self.log_dict(m, sync_dist=True, batch_size=len(batch))
        self.log("val_loss", loss, sync_dist=True, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, noam_lambda(self.model_cfg.encoder.d_model, o.warmup_steps, o.lr, o.min_lr)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nest_counters"] = {
            "audio_seconds": self.audio_seconds, "padded_seconds": self.padded_seconds,
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        c = checkpoint.get("nest_counters", {})
        self.audio_seconds = c.get("audio_seconds", 0.0)
        self.padded_seconds = c.get("padded_seconds", 0.0)
        self.skipped_steps = c.get("skipped_steps", 0)

    def summary(self) -> dict:
        """What a run printed at its end: audio seen, padding, first and last loss."""
        total = self.audio_seconds + self.padded_seconds
        h = self.loss_history
        k = max(1, min(10, len(h) // 5))
        return {
            "steps": int(self.global_step),
            "audio_hours_seen": self.audio_seconds / 3600,
            "padding_ratio": self.padded_seconds / total if total else math.nan,
            "first_loss": sum(h[:k]) / k if h else math.nan,
            "last_loss": sum(h[-k:]) / k if h else math.nan,
            "skipped_steps": self.skipped_steps,
        }


def make_module(model_cfg: ModelConfig, optim_cfg: OptimConfig, max_bad_steps: int, seed: int) -> NestLightningModule:
    return NestLightningModule(asdict(model_cfg), asdict(optim_cfg), max_bad_steps=max_bad_steps, seed=seed)
