"""A training run from a RunConfig: checks, experiment folder, Lightning Trainer, summary."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from cuts.bins import Bins
from cuts.datamodule import NestDataModule
from cuts.sampler import open_cuts
from nest.checkpoint import load_model, load_nemo, load_weights
from nest.config import ConfigError, RunConfig, to_yaml
from nest.lightning import NestLightningModule, make_module

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it: a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def check_inputs(cfg: RunConfig) -> None:
    """Fail before training on what would fail later: missing or empty sets, unreadable bins."""
    d = cfg.data
    if not d.train_cuts:
        raise ConfigError("data.train_cuts is empty: give one or more CutSet manifests or Shar folders")
    for key, sources in (("data.train_cuts", d.train_cuts), ("data.val_cuts", d.val_cuts), ("data.noise_cuts", d.noise_cuts)):
        for s in sources:
            if not Path(s).exists():
                raise ConfigError(f"{key}: {s} does not exist")
            try:
                first = next(iter(open_cuts(s, cfg.seed)), None)
            except Exception as e:
                raise ConfigError(f"{key}: {s} is not a readable CutSet ({type(e).__name__}: {e})") from None
            if first is None:
                raise ConfigError(f"{key}: {s} holds no cuts")
    if d.bins:
        try:
            Bins.load(d.bins)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.bins: {e}") from None
    if d.bucket_batch_size and not Path(d.bucket_batch_size).is_file():
        raise ConfigError(f"data.bucket_batch_size: {d.bucket_batch_size} does not exist")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise ConfigError(f"init_from: {cfg.init_from} does not exist")


def find_resume(cfg: RunConfig) -> Optional[str]:
    if cfg.resume in (None, "", "none"):
        return None
    if cfg.resume == "auto":
        last = Path(cfg.exp_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(cfg.resume).is_file():
        raise ConfigError(f"resume: {cfg.resume} does not exist")
    return cfg.resume


def initialize(module: NestLightningModule, cfg: RunConfig) -> None:
    """Copy weights from ``init_from`` (a .nemo file or our checkpoint), filtered by name patterns."""
    path = cfg.init_from
    if path.endswith(".nemo"):
        _, state = load_nemo(path)
    else:
        state = load_model(path).state_dict()
    loaded = load_weights(module.model, state, path, cfg.init_include, cfg.init_exclude,
                          strict=not (cfg.init_include or cfg.init_exclude))
    log.info("init_from %s: %d tensors loaded", path, len(loaded))


def make_logger(cfg: RunConfig, exp_dir: Path):
    """TensorBoard under exp_dir/tb by default; Weights & Biases when asked (an optional extra)."""
    if cfg.trainer.logger == "wandb":
        try:
            from pytorch_lightning.loggers import WandbLogger

            return WandbLogger(project=cfg.trainer.wandb_project or "nest", save_dir=str(exp_dir))
        except ModuleNotFoundError:
            raise ConfigError("trainer.logger=wandb needs the wandb package: pip install '.[wandb]'") from None
    return TensorBoardLogger(str(exp_dir), name="tb", version="")


def build_trainer(cfg: RunConfig, exp_dir: Path) -> pl.Trainer:
    t = cfg.trainer
    on_gpu = torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda")
    precision = t.precision or ("bf16-mixed" if on_gpu else "32-true")
    ckpt_dir = exp_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                        every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=-1, save_last=True),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.data.val_cuts:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min",
                                         save_top_k=1, auto_insert_metric_name=False))
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval if cfg.data.val_cuts else None,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if cfg.data.val_cuts else 0,
        num_sanity_val_steps=0,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        sync_batchnorm=t.sync_batchnorm and on_gpu and t.strategy != "auto",  # SyncBatchNorm needs CUDA
        use_distributed_sampler=False,  # lhotse's sampler splits the data between ranks itself
        logger=make_logger(cfg, exp_dir),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(exp_dir),
    )


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns the summary that is also written to exp_dir/summary.json."""
    check_inputs(cfg)
    exp_dir = Path(cfg.exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "config.yaml").write_text(to_yaml(cfg))
    pl.seed_everything(cfg.seed, workers=False)
    datamodule = NestDataModule(cfg.data, cfg.model.preprocessor.sample_rate, cfg.seed)
    module = make_module(cfg.model, cfg.optim, cfg.trainer.max_bad_steps, cfg.seed)
    ckpt_path = find_resume(cfg)
    if cfg.init_from and ckpt_path is None:
        initialize(module, cfg)
    trainer = build_trainer(cfg, exp_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    summary = module.summary()
    if trainer.is_global_zero:
        (exp_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

