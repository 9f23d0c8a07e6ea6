"""A training run from a RunConfig: preflight, experiment folder, Lightning Trainer, summary."""
from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins import LayerSync
from pytorch_lightning.plugins.environments import SLURMEnvironment

from cuts.feed import DataSetupError
from cuts.io import atomic_write
from cuts.sampler import NoBatchError
from nest.config.load import to_yaml
from nest.config.schema import RunConfig
from nest.errors import CheckpointError, ConfigError, DataLoadError, NonFiniteLossError
from nest.io.checkpoint import config_differences, load_state, load_weights, selected
from nest.training import lightning_private
from nest.training.allocator import use_training_allocator
from nest.training.data import NestDataModule
from nest.training.module import NestLightningModule, make_module
from nest.training.preflight import preflight
from nest.training.saving import SaveOnRequest, WindowEndCheckpoint, catch_sigusr1_early
from nest.training.step import StepOptions
from nest.training.sync_batchnorm import convert_batchnorm, revert_batchnorm

log = logging.getLogger(__name__)
# Errors whose message is the whole story for the user: train.py prints it without a traceback.
RUN_ERRORS = (ConfigError, NoBatchError, DataSetupError, DataLoadError, NonFiniteLossError, CheckpointError)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, syncs it to disk and renames it: a kill or a power loss
    never leaves half a checkpoint under a checkpoint's name."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_write(path, binary=True) as f:
            torch.save(checkpoint, f)


def initialize(module: NestLightningModule, cfg: RunConfig) -> None:
    """Copy weights from ``init_from`` (a .nemo file or our checkpoint), filtered by name patterns, after checking
    that the checkpoint's model computes what this run's model does."""
    path = cfg.init_from
    try:
        theirs, state = load_state(path)
        chosen = [k for k in state if selected(k, cfg.init_include, cfg.init_exclude)]
        diffs = config_differences(theirs, module.model_cfg, chosen)
        if diffs:
            raise ConfigError(
                f"init_from {path}: its model differs from this run's: {'; '.join(diffs)}. Set these keys to the "
                f"checkpoint's values, or give init_model_config=true to take the checkpoint's model configuration"
            )
        report = load_weights(module.model, state, path, cfg.init_include, cfg.init_exclude,
                              strict=not (cfg.init_include or cfg.init_exclude))
    except CheckpointError as e:
        raise ConfigError(f"init_from: {e}") from None
    log.info("init_from %s: %s", path, report)


def make_logger(cfg: RunConfig, exp_dir: Path):
    """TensorBoard under exp_dir/tb by default; Weights & Biases when asked (an optional extra)."""
    if cfg.trainer.logger == "wandb":
        try:
            from pytorch_lightning.loggers import WandbLogger

            return WandbLogger(project=cfg.trainer.wandb_project or "nest", save_dir=str(exp_dir))
        except ModuleNotFoundError:
            raise ConfigError("trainer.logger=wandb needs the wandb package: pip install '.[wandb]'") from None
    return TensorBoardLogger(str(exp_dir), name="tb", version="", default_hp_metric=False)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, showing the module's ``progress`` (numbers already on the host, set on logging steps)."""

    def get_metrics(self, trainer, pl_module) -> dict:
        return {**super().get_metrics(trainer, pl_module), **pl_module.progress}


# Checkpoints are taken after the optimizer step on purpose (the data position is committed with it).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# A used exp_dir is refused at start-up unless resumed (check_exp_dir): then its checkpoints are expected there.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Validation metrics are reduced over ranks by the module itself (one all-reduce per round) before logging.
warnings.filterwarnings("ignore", message=r".*It is recommended to use `self.log\('val")
# Lightning's own tree helper builds torch's deprecated LeafSpec on every batch (its business, not the user's).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                        module=r"pytorch_lightning\.utilities\._pytree")


class _NoAdvert(logging.Filter):
    """Lightning advertises a cloud logging service at every Trainer (a 'Tip', not about this run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdvert())


class SyncBatchNormPlugin(LayerSync):
    """``trainer.sync_batchnorm``: BatchNorm layers become nest.training.sync_batchnorm's SyncedBatchNorm (no
    host sync, any backend) instead of torch's SyncBatchNorm (Lightning's own ``sync_batchnorm=True``). Lightning
    applies a LayerSync in every DDP-like strategy (the one ``auto`` picks on several devices included) before the
    model moves to its device and the optimizer is built, reverts it when fitting ends, and ignores it on one
    device; with one process the layers compute as BatchNorm."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return convert_batchnorm(model)

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        return revert_batchnorm(model)


def trainer_options(cfg: RunConfig, cuda: bool) -> dict:
    """Lightning Trainer arguments that depend on the configuration and the machine, kept apart so that tests
    can check them: the precision, and the synchronised BatchNorm as a plugin (Lightning's own flag stays off)."""
    t = cfg.trainer
    on_gpu = cuda and t.accelerator in ("auto", "gpu", "cuda")
    if t.accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"trainer.accelerator={t.accelerator} but no CUDA device is visible; use cpu or auto")
    return {"precision": t.precision or ("bf16-mixed" if on_gpu else "32-true"), "sync_batchnorm": False,
            "plugins": [SyncBatchNormPlugin()] if t.sync_batchnorm else []}


def build_trainer(cfg: RunConfig, exp_dir: Path) -> pl.Trainer:
    t = cfg.trainer
    ckpt_dir = exp_dir / "checkpoints"
    A = t.accumulate_grad_batches
    # The newest keep_last step checkpoints ("step" is a metric Lightning always offers), plus last.ckpt.
    steps = WindowEndCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                                every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=t.keep_last, monitor="step",
                                mode="max", save_last=True, enable_version_counter=False)
    callbacks = [steps, SaveOnRequest(ckpt_dir / "last.ckpt", t.checkpoint_every_minutes, steps)]
    if cfg.data.val_cuts:
        callbacks.append(WindowEndCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min",
                                             save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    # A bar redrawn with carriage returns fills a log file (batch jobs, `| tee`): log lines there instead.
    bar = t.enable_progress_bar and sys.stderr.isatty()
    if bar:
        # Refreshed on logging steps only: reading the logged values is what waits on the device.
        callbacks.append(ProgressBar(refresh_rate=t.log_every_n_steps))
    options = trainer_options(cfg, torch.cuda.is_available())
    plugins = [AtomicCheckpointIO(), *options.pop("plugins")]
    if SLURMEnvironment.detect():  # preemption is SaveOnRequest's (SIGUSR1), not Lightning's handler
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        trainer = pl.Trainer(
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
            max_steps=t.max_steps,
            # Lightning counts batches for validation; ours are optimizer steps of A batches each.
            val_check_interval=t.val_check_interval * A if cfg.data.val_cuts else None,
            check_val_every_n_epoch=None,
            limit_val_batches=t.limit_val_batches if cfg.data.val_cuts else 0,
            num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, enable_progress_bar=bar,
            use_distributed_sampler=False,  # lhotse's samplers split the data between ranks themselves
            logger=make_logger(cfg, exp_dir), callbacks=callbacks, plugins=plugins,
            default_root_dir=str(exp_dir), **options,
        )
    except (ValueError, RuntimeError, TypeError) as e:  # Lightning's MisconfigurationException is a ValueError
        raise ConfigError(f"trainer: {e} (trainer.accelerator={t.accelerator}, trainer.devices={t.devices}, "
                          f"trainer.strategy={t.strategy}, trainer.num_nodes={t.num_nodes})") from None
    # Buffers are not broadcast from rank 0 before every forward pass: the mel filterbank and window are derived
    # from the config, BatchNorm statistics are equal on every rank when synchronised (and rank 0's are the ones
    # saved when not). Gradients live in DDP's all-reduce buckets instead of beside them (one copy less).
    lightning_private.configure_ddp(trainer, timedelta(minutes=t.ddp_timeout_minutes), broadcast_buffers=False,
                                    gradient_as_bucket_view=True)
    return trainer


def _clean_error(e: BaseException) -> Optional[BaseException]:
    """The first error of ours in ``e``'s chain (Lightning wraps errors raised inside its loops)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, RUN_ERRORS):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns the summary that is also written to exp_dir/summary.json."""
    use_training_allocator()  # before the first CUDA allocation; calibration uses the same settings
    catch_sigusr1_early()
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    start = preflight(cfg)
    exp_dir, ckpt_path = start.exp_dir, start.resume_from
    step = StepOptions(accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
                       gradient_clip_val=cfg.trainer.gradient_clip_val, max_bad_steps=cfg.trainer.max_bad_steps,
                       max_failed_fraction=cfg.data.max_failed_fraction)
    module = make_module(cfg.model, cfg.optim, step, cfg.seed)
    if cfg.init_from and ckpt_path is None:
        initialize(module, cfg)
    trainer = build_trainer(cfg, exp_dir)
    if trainer.is_global_zero:
        try:
            exp_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(exp_dir / "config.yaml") as f:
                f.write(to_yaml(cfg))
        except OSError as e:  # what the preflight's permission check cannot see (read-only mounts, /proc, quotas)
            raise ConfigError(f"exp_dir {exp_dir}: cannot write there ({e.strerror or e}): give a folder this run "
                              f"can write") from None
    try:
        trainer.fit(module, datamodule=NestDataModule(start.feed), ckpt_path=ckpt_path)
    except Exception as e:
        ours = _clean_error(e)
        if ours is None or ours is e:
            raise
        raise ours from None
    summary = module.summary()
    saver = next(c for c in trainer.callbacks if isinstance(c, SaveOnRequest))
    if saver.preempted or trainer.received_sigterm:
        summary["stopped_by"] = "SIGUSR1" if saver.preempted else "SIGTERM"
    if trainer.is_global_zero:
        with atomic_write(exp_dir / "summary.json") as f:
            f.write(json.dumps(summary, indent=1))
    return summary
