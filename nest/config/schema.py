"""The run configuration's schema: one typed dataclass per section (data, model, optim, trainer).

The trailing ``# comment`` of each field is its one line of ``--help`` (nest.config.help).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from cuts.config import DataConfig
from nest.objectives.config import ModelConfig


@dataclass
class OptimConfig:
    """AdamW with Noam annealing, NeMo's NEST defaults."""

    lr: float = 5.0  # scaled by d_model^-0.5 and the Noam schedule
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW's (beta1, beta2)
    weight_decay: float = 1e-3  # decoupled weight decay
    warmup_steps: int = 25000  # Noam warm-up, in optimizer steps
    min_lr: float = 1e-6  # the learning rate never decays below this


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets, and the training step's guards."""

    accelerator: str = "auto"  # auto | cpu | gpu | cuda | ... (Lightning's accelerators)
    devices: Any = "auto"  # number of devices per node, a list of ids, or auto
    num_nodes: int = 1  # machines (torchrun or SLURM start one process per device)
    strategy: str = "auto"  # auto | ddp | ... (Lightning's strategies; several devices: DDP)
    precision: Optional[str] = None  # 32-true | bf16-mixed; null: bf16-mixed on GPU, 32-true on CPU
    max_steps: int = 500000  # optimizer steps of the whole run
    val_check_interval: int = 2500  # optimizer steps between validations
    limit_val_batches: Optional[int] = None  # validation batches per validation (null: all)
    accumulate_grad_batches: int = 1  # batches per optimizer step
    gradient_clip_val: float = 0.0  # clip the gradient norm to this (0: off)
    log_every_n_steps: int = 10  # batches between logging steps (the only steps that wait on the device)
    checkpoint_every_n_steps: int = 2500  # optimizer steps between step checkpoints
    checkpoint_every_minutes: Optional[float] = None  # also refresh last.ckpt this often (null: off)
    keep_last: int = 5  # step checkpoints kept besides last.ckpt and best.ckpt (-1: all)
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    enable_progress_bar: bool = True  # tqdm progress bar with loss and audio-s/s on a terminal (log lines elsewhere)
    sync_batchnorm: bool = True  # BatchNorm statistics over all ranks' batches under DDP (any accelerator)
    ddp_timeout_minutes: float = 30.0  # how long a collective waits for the other ranks before the run fails
    logger: str = "tensorboard"  # tensorboard | wandb (pip install '.[wandb]')
    wandb_project: Optional[str] = None  # W&B project (default: nest)


@dataclass
class RunConfig:
    """Everything train.py reads."""

    exp_dir: str = "exp/nest"  # checkpoints, TensorBoard logs, config.yaml and summary.json of the run
    seed: int = 42  # seeds data order, noise, masks and initialisation
    resume: Optional[str] = None  # auto (continue exp_dir's last checkpoint, or start) | PATH
    init_from: Optional[str] = None  # start from the weights of our checkpoint or a NeMo .nemo file
    init_model_config: bool = False  # take model.* from init_from's own config (key=value overrides still apply)
    init_include: List[str] = field(default_factory=list)  # fnmatch patterns of parameters to load (e.g. encoder.*)
    init_exclude: List[str] = field(default_factory=list)  # fnmatch patterns of parameters not to load
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
