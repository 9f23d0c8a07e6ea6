"""Value checks of a RunConfig that types alone do not catch; each error names the key, the range or
choices and the value given, at start-up. (Names that only Lightning's registries know are checked by
nest.training.preflight, the one package that imports Lightning.)"""
from __future__ import annotations

import math
import os
import typing
from typing import Any, Callable, Iterable

from nest.config.schema import RunConfig
from nest.errors import ConfigError
from nest.objectives import OBJECTIVES
from nest.objectives.config import validate_w2vbert

# Lightning's precision values, and why this project refuses some of them.
SUPPORTED_PRECISION = ("32", "32-true", "bf16-mixed", "bf16")
REFUSED_PRECISION = {
    "bf16-true": "it casts the frozen quantizer, the mel filterbank and the input audio to bfloat16, which changes "
                 "the targets; bf16-mixed runs the encoder in bfloat16 with float32 weights at the same speed",
    "16-true": "float16 weights and optimizer state overflow; use bf16-mixed",
    "16-mixed": "its GradScaler replaces the device-side decision to skip a step (fused AdamW's found_inf) with its "
                "own, so a non-finite loss would update the weights; use bf16-mixed (or 32-true on GPUs without bf16)",
    "16": "its GradScaler replaces the device-side decision to skip a step (fused AdamW's found_inf) with its own, "
          "so a non-finite loss would update the weights; use bf16-mixed (or 32-true on GPUs without bf16)",
    "64-true": "float64 training is not supported; use 32-true",
    "64": "float64 training is not supported; use 32-true",
    "transformer-engine": "Transformer Engine is not wired into this model; use bf16-mixed",
    "transformer-engine-float16": "Transformer Engine is not wired into this model; use bf16-mixed",
}
# Common values accepted without importing Lightning (seconds at start-up); others are checked against its
# registries by nest.training.preflight.
KNOWN_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
KNOWN_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "single_device")
# The training step (accumulation without gradient all-reduce, the skip decided on the device, the data stream's
# position per rank) is written for DDP with one process per device started by torchrun, SLURM or Lightning.
REFUSED_STRATEGY = ("fsdp", "deepspeed", "ddp_spawn", "ddp_fork", "ddp_notebook", "xla", "single_xla", "ddp_sharded")


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _require(cfg: RunConfig, keys: Iterable[str], ok: Callable[[Any], bool], what: str) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r}: must be {what}")


def _choice(key: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}")


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError for the first value out of its range or choices."""
    enc, data, t = cfg.model.encoder, cfg.data, cfg.trainer
    probability = lambda v: 0.0 <= v <= 1.0  # noqa: E731
    positive = lambda v: v > 0 and math.isfinite(v)  # noqa: E731
    _require(cfg, ["data.noise.prob", "data.noise.noise_ratio", "data.max_failed_fraction", "model.masking.mask_prob",
                   "model.masking.max_mask_ratio", "model.mask_threshold", "model.encoder.dropout",
                   "model.encoder.dropout_pre_encoder", "model.encoder.dropout_emb", "model.encoder.dropout_att",
                   "model.encoder.stochastic_depth_drop_prob"], probability, "a probability in [0, 1]")
    _require(cfg, ["data.batch_duration", "data.max_duration", "data.val_batch_duration", "data.quadratic_duration",
                   "model.preprocessor.window_size", "model.preprocessor.window_stride", "optim.lr",
                   "trainer.checkpoint_every_minutes", "trainer.ddp_timeout_minutes"], positive, "> 0 (seconds, or a rate)")
    _require(cfg, ["data.min_duration", "data.read_timeout", "optim.weight_decay", "optim.min_lr",
                   "trainer.gradient_clip_val", "model.preprocessor.dither"], lambda v: v >= 0, ">= 0")
    _require(cfg, ["data.num_buckets", "trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps",
                   "trainer.checkpoint_every_n_steps", "trainer.accumulate_grad_batches", "trainer.max_bad_steps",
                   "trainer.num_nodes", "model.masking.block_size", "model.quantizer.num_classes",
                   "model.quantizer.num_books", "model.encoder.n_layers", "model.preprocessor.sample_rate"],
             lambda v: v >= 1, "an integer >= 1")
    _require(cfg, ["optim.warmup_steps"], lambda v: v >= 0, "an integer >= 0")
    _require(cfg, ["data.num_workers"], lambda v: v == "auto" or (isinstance(v, int) and v >= 0),
             "auto or an integer >= 0")
    _require(cfg, ["data.noise_bank_seconds"], lambda v: v == 0 or (v >= 1 and math.isfinite(v)),
             "0 (no bank) or at least 1 (seconds; 3600 is an hour of noise, 230 MB)")
    if data.noise_bank_seconds > 0 and not data.mix_on_device:
        raise ConfigError(f"data.noise_bank_seconds={data.noise_bank_seconds} needs data.mix_on_device=true: the "
                          f"bank lives in device memory, where the noise is mixed")
    _require(cfg, ["trainer.keep_last"], lambda v: v >= -1, "-1 (keep all) or a number of checkpoints >= 0")
    if data.min_duration > data.max_duration:
        raise ConfigError(f"data.min_duration={data.min_duration} is above data.max_duration={data.max_duration}")
    for name in ("snr", "speech_snr", "mix_rate", "num_segments", "num_speakers"):
        pair = getattr(data.noise, name)
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"data.noise.{name}={pair}: give [low, high] with low <= high")
    if not 0 <= data.noise.mix_rate[0] <= data.noise.mix_rate[1] <= 1:
        raise ConfigError(f"data.noise.mix_rate={data.noise.mix_rate}: must lie within [0, 1]")
    if data.noise.num_segments[0] < 1 or data.noise.num_speakers[0] < 1:
        raise ConfigError(f"data.noise.num_segments={data.noise.num_segments}, num_speakers="
                          f"{data.noise.num_speakers}: at least 1 each")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas}: give [beta1, beta2], each in [0, 1)")
    if data.train_weights and len(data.train_weights) != len(data.train_cuts):
        raise ConfigError(f"data.train_weights has {len(data.train_weights)} entries for "
                          f"{len(data.train_cuts)} data.train_cuts: give one weight per entry, or none")
    if enc.d_model % enc.n_heads:
        raise ConfigError(f"model.encoder.d_model={enc.d_model} must be divisible by n_heads={enc.n_heads}")
    _choice("model.encoder.subsampling_factor", enc.subsampling_factor, (2, 4, 8, 16))
    _choice("model.encoder.conv_norm_type", enc.conv_norm_type, ("batch_norm", "layer_norm"))
    if not enc.untie_biases:
        raise ConfigError("model.encoder.untie_biases=false: positional biases shared by all layers are not "
                          "implemented (the encoder has NeMo's default, one pair per layer); leave it true")
    _choice("model.encoder.stochastic_depth_mode", enc.stochastic_depth_mode, ("linear", "uniform"))
    _choice("model.quantizer.dist_fn", cfg.model.quantizer.dist_fn, ("l2", "cosine"))
    _choice("model.quantizer.norm", cfg.model.quantizer.norm, ("none", "layer"))
    _choice("model.mask_position", cfg.model.mask_position, ("pre_conv", "post_conv"))
    if cfg.model.mask_position == "post_conv" and cfg.model.masking.block_size < enc.subsampling_factor:
        raise ConfigError(f"model.masking.block_size={cfg.model.masking.block_size} is under one subsampled frame "
                          f"(subsampling_factor={enc.subsampling_factor}) with mask_position=post_conv")
    c = enc.subsampling_conv_chunking_factor
    if c not in (-1, 1) and (c < 1 or c & (c - 1)):
        raise ConfigError(f"model.encoder.subsampling_conv_chunking_factor={c}: use -1, 1 or a power of 2")
    _choice("data.noise.snr_definition", data.noise.snr_definition, ("nemo", "segment"))
    _choice("model.objective", cfg.model.objective, tuple(OBJECTIVES))
    _choice("model.targets", cfg.model.targets, ("random_projection", "kmeans"))
    if cfg.model.targets == "kmeans" and cfg.model.objective != "nest":
        raise ConfigError("model.targets=kmeans goes with model.objective=nest (w2vbert learns its own targets)")
    validate_w2vbert(cfg.model.w2vbert, cfg.model.preprocessor.features)
    if enc.conv_kernel_size % 2 == 0:
        raise ConfigError(f"model.encoder.conv_kernel_size={enc.conv_kernel_size} must be odd")
    _choice("trainer.logger", t.logger, ("tensorboard", "wandb"))
    if cfg.resume not in (None, "", "auto") and not str(cfg.resume).endswith((".ckpt", ".pt")):
        if os.path.isdir(str(cfg.resume)):
            raise ConfigError(f"resume={cfg.resume!r} is a folder: continue the run it holds with resume=auto "
                              f"exp_dir={cfg.resume}, or give the path of a .ckpt checkpoint")
        raise ConfigError(f"resume={cfg.resume!r}: give auto or the path of a .ckpt checkpoint")
    check_precision(t.precision)
    if str(t.strategy).startswith(REFUSED_STRATEGY):
        raise ConfigError(f"trainer.strategy={t.strategy!r} is not supported: the training step is written for DDP "
                          f"with one process per device; use auto or ddp")


def check_precision(precision: typing.Optional[str]) -> None:
    if precision is None:
        return
    precision = str(precision)
    if precision in REFUSED_PRECISION:
        raise ConfigError(f"trainer.precision={precision} is refused: {REFUSED_PRECISION[precision]}")
    _choice("trainer.precision", precision, SUPPORTED_PRECISION)
